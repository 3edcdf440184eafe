//! The VM's PCI bus: the root complex on the port bus (0xCF8) and the MMIO
//! bus (ECAM and the BAR window), the virtio devices built from the
//! configuration, and their KVM plumbing.
//!
//! - **MSI-X.** Each virtio function gets one GSI per vector (from 24 up,
//!   after the IOAPIC's pins) with an irqfd on it. When the guest programs
//!   or unmasks a vector, its GSI's MSI route is set and the whole routing
//!   table goes to KVM_SET_GSI_ROUTING, which replaces KVM's default table,
//!   so the table always starts with those defaults (GSIs 0-15 to the PICs
//!   and the IOAPIC, 16-23 to the IOAPIC).
//! - **INTx.** The fallback when MSI-X is off: an irqfd on the GSI the DSDT's
//!   `_PRT` gives the slot's INTA (`layout::pci_intx_gsi`), with a resample
//!   eventfd so the line is level-triggered: KVM keeps it asserted until the
//!   guest's end of interrupt, and the `pci-intx` thread asserts it again if
//!   the device's ISR is still set then.
//! - **Notifications.** Every queue's notify address is a KVM ioeventfd, so
//!   a kick wakes the device's worker without a VMM exit; when the guest
//!   moves the BAR the ioeventfds move with it.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use arch::layout::{
    self, IOAPIC_PINS, PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN, PCI_ECAM_SIZE, PCI_ECAM_START,
    PCI_MMIO_SIZE, PCI_MMIO_START,
};
use devices::Bus;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{
    IntxResampler, IoEvents, MsiDelivery, MsiMessage, PciConfigIo, PciConfigMmio, PciMmioWindow,
    PciRoot, SharedRoot, VirtioPciDevice,
};
use thiserror::Error;
use virtio::console::ConsoleInput;
use virtio::VirtioDevice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConsoleMode, DiskConfig, NetAttach, NetConfig, VmConfig};
use crate::console::InputSink;
use crate::guest_file;
use crate::memory::GuestMemory;
use crate::rate::{Limits, LimitsBuilder};
use crate::region::{self, RegionBacking};
use virtio::net::{SharedRamSlot, VhostUserNet};

/// The highest GSI handed out for MSI-X vectors.
const MAX_GSI: u32 = 1023;

/// Errors from building the PCI bus and its devices.
#[derive(Debug, Error)]
pub enum PciError {
    /// A device given on the command line could not be built; `flag` is the
    /// option as the user would have written it.
    #[error("{flag}")]
    Device {
        flag: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The bus is full or its window is.
    #[error("cannot place a PCI device")]
    Root(#[from] pci::RootError),
    /// The transport could not be built.
    #[error("cannot build a virtio-pci transport")]
    Transport(#[from] pci::VirtioPciError),
    /// More interrupt vectors than GSIs.
    #[error("out of interrupt numbers for PCI devices")]
    NoGsi,
    /// An eventfd or a KVM registration failed.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] std::io::Error),
    /// Two devices claim the same addresses.
    #[error("cannot place the PCI bus")]
    Bus(#[from] devices::BusError),
}

fn kvm_io(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

fn msi_entry(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = message.address as u32;
    entry.u.msi.address_hi = (message.address >> 32) as u32;
    entry.u.msi.data = message.data;
    entry
}

/// KVM's default routes: GSIs 0-15 to the PIC pins and the IOAPIC, 16-23 to
/// the IOAPIC.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip_entry(gsi, chip, gsi % 8));
        }
        routes.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

/// The VM's GSI routing table: the defaults plus one MSI route per
/// programmed vector.
#[derive(Debug)]
pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

#[derive(Debug)]
struct RouterState {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            state: Mutex::new(RouterState {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `count` consecutive GSIs and returns the first.
    pub(crate) fn allocate(&self, count: u32) -> Result<u32, PciError> {
        let mut state = self.state();
        let first = state.next_gsi;
        let end = first.checked_add(count).filter(|&e| e <= MAX_GSI + 1);
        state.next_gsi = end.ok_or(PciError::NoGsi)?;
        Ok(first)
    }

    /// Points `gsi` at `message` and hands the table to KVM.
    pub(crate) fn set_msi(&self, gsi: u32, message: MsiMessage) -> std::io::Result<()> {
        self.state().update(gsi, message, |routing| {
            self.vm.set_gsi_routing(routing).map_err(kvm_io)
        })
    }
}

impl RouterState {
    /// Builds the table with `gsi` pointing at `message` and hands it to
    /// `apply`; the table is kept only if `apply` succeeds, so the stored
    /// routes always match KVM's and a failed update is retried by the next
    /// write of the same message.
    fn update<F>(&mut self, gsi: u32, message: MsiMessage, apply: F) -> std::io::Result<()>
    where
        F: FnOnce(&KvmIrqRouting) -> std::io::Result<()>,
    {
        if self.msi.get(&gsi) == Some(&message) {
            return Ok(());
        }
        let mut msi = self.msi.clone();
        msi.insert(gsi, message);
        let mut entries = default_routes();
        entries.extend(msi.iter().map(|(&g, &m)| msi_entry(g, m)));
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
        apply(&routing)?;
        self.msi = msi;
        Ok(())
    }
}

/// One function's MSI-X vectors: a GSI and an irqfd each.
struct KvmMsi {
    router: Arc<GsiRouter>,
    first_gsi: u32,
    irqfds: Vec<EventFd>,
}

impl MsiDelivery for KvmMsi {
    fn route(&self, vector: u16, message: MsiMessage) -> std::io::Result<()> {
        if usize::from(vector) >= self.irqfds.len() {
            return Ok(());
        }
        self.router
            .set_msi(self.first_gsi + u32::from(vector), message)
    }

    fn signal(&self, vector: u16) -> std::io::Result<()> {
        match self.irqfds.get(usize::from(vector)) {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }

    fn irqfd(&self, vector: u16) -> Option<EventFd> {
        self.irqfds.get(usize::from(vector))?.try_clone().ok()
    }
}

/// Notify addresses as KVM ioeventfds (any width, no data match).
struct KvmIoEvents {
    vm: Arc<VmFd>,
}

impl IoEvents for KvmIoEvents {
    fn register(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_io)
    }

    fn unregister(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_io)
    }
}

fn new_eventfd(what: &'static str) -> Result<EventFd, PciError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| PciError::Kvm(what, e))
}

/// A virtio device to put on the bus, with the option that asked for it.
pub struct DeviceSpec {
    pub flag: String,
    pub device: Box<dyn VirtioDevice>,
}

impl std::fmt::Debug for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSpec")
            .field("flag", &self.flag)
            .finish_non_exhaustive()
    }
}

fn device_error<E>(flag: String) -> impl FnOnce(E) -> PciError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |e| PciError::Device {
        flag,
        source: Box::new(e),
    }
}

/// The `--disk` option as the user wrote it.
fn disk_flag(disk: &DiskConfig) -> String {
    let readonly = if disk.readonly { ",readonly=on" } else { "" };
    format!("--disk path={}{readonly}", disk.path.display())
}

/// The `--net` option as the user wrote it.
fn net_flag(net: &NetConfig) -> String {
    let attach = match &net.attach {
        NetAttach::Tap(tap) => format!("tap={tap}"),
        NetAttach::VhostUser(path) => format!("vhost-user={}", path.display()),
        NetAttach::Switch { name, .. } => format!("switch={name}"),
    };
    match net.mac {
        Some(m) => format!(
            "--net {attach},mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        ),
        None => format!("--net {attach}"),
    }
}

/// The MAC of a NIC given none: locally administered, from this VMM's
/// process id (unique among running VMs) and the NIC's index.
fn default_mac(index: usize) -> [u8; 6] {
    virtio::net::local_mac(u64::from(std::process::id()) << 16 | index as u64)
}

/// Opens a disk image (a path or an inherited `fd:N`) and takes its lock:
/// a write lock for a read-write disk, a read lock for a read-only one.
fn open_disk(
    disk: &DiskConfig,
    serial: &str,
) -> Result<virtio::block::Block, Box<dyn std::error::Error + Send + Sync>> {
    let file = crate::guest_file::open(&disk.path, !disk.readonly).map_err(|e| {
        Box::new(virtio::block::BlockError::Open {
            path: disk.path.clone(),
            source: e,
        })
    })?;
    crate::guest_file::lock(&file, !disk.readonly, &disk.path)?;
    Ok(virtio::block::Block::from_file(
        file,
        &disk.path,
        disk.readonly,
        serial,
    )?)
}

/// The virtio devices a configuration asks for, and the console's input
/// when the console is a virtio one.
#[derive(Debug, Default)]
pub struct DeviceSet {
    pub specs: Vec<DeviceSpec>,
    pub console_input: Option<ConsoleInput>,
    /// The rate limiters of the disks and NICs, by device name.
    pub limits: Limits,
    /// Shared regions, mapped; each becomes an ivshmem device after the
    /// virtio devices.
    pub regions: Vec<RegionBacking>,
    /// Guest RAM as vhost-user backends map it, once it exists.
    pub shared_ram: SharedRamSlot,
}

impl DeviceSet {
    fn push(&mut self, flag: String, device: Box<dyn VirtioDevice>) {
        self.specs.push(DeviceSpec { flag, device });
    }
}

/// Builds the virtio devices `config` asks for, in bus order: disks, NICs,
/// the console, the entropy source, vsock. Opens their files, taps and
/// sockets, so a bad option fails here, before the VM exists.
pub fn devices_from_config(config: &VmConfig) -> Result<DeviceSet, PciError> {
    let mut set = DeviceSet::default();
    let mut limits = LimitsBuilder::default();
    for (index, disk) in config.disks.iter().enumerate() {
        let flag = disk_flag(disk);
        let serial = format!("fvdisk{index}");
        let limiter = limits
            .add(format!("disk{index}"), disk.rate)
            .map_err(device_error(flag.clone()))?;
        let block = open_disk(disk, &serial)
            .map_err(|e| PciError::Device {
                flag: flag.clone(),
                source: e,
            })?
            .with_rate_limiter(limiter);
        set.push(flag, Box::new(block));
    }
    for (index, net) in config.nets.iter().enumerate() {
        let flag = net_flag(net);
        let mac = net.mac.unwrap_or_else(|| default_mac(index));
        let tap = match &net.attach {
            NetAttach::Tap(tap) => tap,
            NetAttach::VhostUser(path) => {
                let nic = guest_file::connect(path)
                    .map_err(|e| virtio::net::VhostUserError::Connect {
                        path: path.display().to_string(),
                        source: e,
                    })
                    .and_then(|stream| {
                        VhostUserNet::with_stream(stream, mac, set.shared_ram.clone())
                    })
                    .map_err(device_error(flag.clone()))?;
                set.push(flag, Box::new(nic));
                continue;
            }
            NetAttach::Switch { name, .. } => {
                return Err(PciError::Device {
                    flag,
                    source: format!(
                        "switch `{name}` is the daemon's: start the guest with `ferrovisor up`"
                    )
                    .into(),
                })
            }
        };
        let tap = virtio::net::Tap::open(tap).map_err(device_error(flag.clone()))?;
        let mut limiter = |dir: &str, spec| {
            limits
                .add(format!("net{index}-{dir}"), spec)
                .map_err(device_error(flag.clone()))
        };
        let (rx, tx) = (limiter("rx", net.rx_rate)?, limiter("tx", net.tx_rate)?);
        let nic = virtio::net::Net::new(Box::new(tap), mac).with_rate_limiters(Some(rx), Some(tx));
        set.push(flag, Box::new(nic));
    }
    set.limits = limits.build();
    if config.console == ConsoleMode::Virtio {
        let flag = "--console virtio".to_string();
        let console = virtio::console::Console::new(crate::console::output())
            .map_err(device_error(flag.clone()))?;
        set.console_input = Some(console.input());
        set.push(flag, Box::new(console));
    }
    if config.rng {
        set.push("--rng".into(), Box::new(virtio::rng::Rng::new()));
    }
    if let Some(vsock) = &config.vsock {
        let flag = format!(
            "--vsock cid={},socket={}",
            vsock.cid,
            vsock.socket.display()
        );
        let mut device = virtio::vsock::Vsock::new(u64::from(vsock.cid), &vsock.socket)
            .map_err(device_error(flag.clone()))?;
        if let Some(route) = &vsock.route {
            device = device.with_route(route);
        }
        set.push(flag, Box::new(device));
    }
    for config in &config.regions {
        let backing =
            RegionBacking::open(config).map_err(device_error(region::region_flag(config)))?;
        set.regions.push(backing);
    }
    Ok(set)
}

/// Starts the thread that re-raises INTx lines after the guest's end of
/// interrupt: each resample eventfd, when KVM signals it, makes its device
/// check whether its line is still due.
fn spawn_resampler(list: Vec<(EventFd, IntxResampler)>) -> Result<(), PciError> {
    let (fds, resamplers): (Vec<EventFd>, Vec<IntxResampler>) = list.into_iter().unzip();
    spawn_eventfd_thread("pci-intx", fds, EventSet::IN, move |index, fd| {
        let _ = fd.read();
        if let Some(resampler) = resamplers.get(index) {
            let _ = resampler.resample();
        }
    })
}

/// Starts a thread named `name` that waits on `fds` (watched for `events`)
/// and calls `on_event` with the index and eventfd of each one ready. It
/// runs under the device workers' seccomp filter, with every signal but
/// SIGSYS blocked (a blocked signal would turn a blocked call into a silent
/// kill instead of the seccomp line).
fn spawn_eventfd_thread(
    name: &str,
    fds: Vec<EventFd>,
    events: EventSet,
    mut on_event: impl FnMut(usize, &EventFd) + Send + 'static,
) -> Result<(), PciError> {
    let epoll = Epoll::new().map_err(|e| PciError::Kvm("create an epoll", e))?;
    for (index, fd) in fds.iter().enumerate() {
        epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(events, index as u64),
            )
            .map_err(|e| PciError::Kvm("watch an eventfd", e))?;
    }
    // SAFETY: an all-zero sigset_t is valid storage for sigfillset.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is valid storage.
    unsafe { libc::sigfillset(&mut all) };
    // SAFETY: as above.
    unsafe { libc::sigdelset(&mut all, libc::SIGSYS) };
    // SAFETY: both sets are valid; this changes only this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::ThreadKind::Worker);
            let mut ready = [EpollEvent::default(); 8];
            loop {
                let n = match epoll.wait(-1, &mut ready) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                for event in &ready[..n] {
                    let index = event.data() as usize;
                    if let Some(fd) = fds.get(index) {
                        on_event(index, fd);
                    }
                }
            }
        });
    // SAFETY: `old` is the mask read above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned
        .map(drop)
        .map_err(|e| PciError::Kvm("start an eventfd thread", e))
}

/// Starts the watcher of a daemon region's own doorbell eventfds: while the
/// guest has MSI-X off (a driver that takes INTx), a peer's doorbell sets
/// Interrupt Status and raises INTx; with MSI-X on, each vector's irqfd
/// (or its hold while masked) carries it and the watcher leaves the
/// eventfd alone. Edge-triggered: one wake-up per doorbell.
fn spawn_doorbell_watcher(fds: Vec<EventFd>, state: Arc<pci::IntxState>) -> Result<(), PciError> {
    spawn_eventfd_thread(
        "region-doorbells",
        fds,
        EventSet::IN | EventSet::EDGE_TRIGGERED,
        move |_, fd| {
            if state.msix_enabled() {
                return;
            }
            // Non-blocking: KVM may have taken the count if MSI-X was on a
            // moment ago.
            if fd.read().is_ok() {
                let _ = state.peer_rang();
            }
        },
    )
}

/// `vectors` MSI-X vectors on consecutive GSIs, each with an irqfd.
fn kvm_msi(vm: &Arc<VmFd>, router: &Arc<GsiRouter>, vectors: u32) -> Result<Arc<KvmMsi>, PciError> {
    let first_gsi = router.allocate(vectors)?;
    let mut irqfds = Vec::new();
    for i in 0..vectors {
        let fd = new_eventfd("create an MSI-X eventfd")?;
        vm.register_irqfd(&fd, first_gsi + i)
            .map_err(|e| PciError::Kvm("register an MSI-X irqfd", kvm_io(e)))?;
        irqfds.push(fd);
    }
    Ok(Arc::new(KvmMsi {
        router: router.clone(),
        first_gsi,
        irqfds,
    }))
}

/// Puts a shared region on the bus as an ivshmem device: INTA on its slot's
/// GSI, the memory placed as a KVM slot wherever BAR 2 decodes. A region
/// from the daemon has one MSI-X vector per eventfd it gave this guest,
/// which peers ring straight through KVM (`region::PeerMsi`), and rings its
/// peers' eventfds; a region from a guest file has one vector and no peers:
/// its doorbells reach nobody and are counted.
fn add_region(
    vm: &Arc<VmFd>,
    router: &Arc<GsiRouter>,
    root: &SharedRoot,
    index: usize,
    mut backing: RegionBacking,
) -> Result<(), PciError> {
    let flag = region::region_flag(&backing.config);
    let mapping = Arc::new(
        backing
            .kvm_mapping(vm, index)
            .map_err(device_error(flag.clone()))?,
    );
    let mut watched = Vec::new();
    let (msi, doorbells, vectors): (Arc<dyn MsiDelivery>, _, _) = match backing.eventfds.take() {
        Some(fds) => {
            let vectors = fds.own.len() as u16;
            watched = nonblocking_clones(&fds.own)?;
            let msi = region::PeerMsi::new(vm, router, fds.own)?;
            (
                Arc::new(msi),
                pci::EventFdDoorbells::new(fds.peers),
                vectors,
            )
        }
        None => (kvm_msi(vm, router, 1)?, pci::EventFdDoorbells::default(), 1),
    };
    let intx = new_eventfd("create an INTx eventfd")?;
    let intx_irqfd = intx
        .try_clone()
        .map_err(|e| PciError::Kvm("create an INTx eventfd", e))?;
    let settings = pci::IvshmemConfig {
        size: backing.size,
        position: backing.config.id,
        vectors,
        read_only: backing.config.readonly,
    };
    let device = pci::IvshmemDevice::new(settings, msi, intx, Arc::new(doorbells), mapping.clone())
        .map_err(device_error(flag.clone()))?;
    if !watched.is_empty() {
        spawn_doorbell_watcher(watched, device.intx_state())?;
    }
    let slot = root
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .add(Box::new(device))?;
    if let Some(e) = mapping.take_error() {
        return Err(device_error(flag)(e));
    }
    vm.register_irqfd(&intx_irqfd, layout::pci_intx_gsi(slot as u32, 0))
        .map_err(|e| PciError::Kvm("register an INTx irqfd", kvm_io(e)))
}

/// Clones of a region's own doorbell eventfds for the watcher, made
/// non-blocking (a flag of the open file, which KVM's irqfd does not mind).
fn nonblocking_clones(fds: &[EventFd]) -> Result<Vec<EventFd>, PciError> {
    fds.iter()
        .map(|fd| {
            let clone = fd
                .try_clone()
                .map_err(|e| PciError::Kvm("clone a doorbell eventfd", e))?;
            let raw = clone.as_raw_fd();
            // SAFETY: F_GETFL on a descriptor this function owns.
            let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
            // SAFETY: F_SETFL on the same descriptor, adding O_NONBLOCK.
            let set = (flags >= 0)
                .then(|| unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) });
            if set.is_none_or(|rc| rc < 0) {
                return Err(PciError::Kvm(
                    "make a doorbell eventfd non-blocking",
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(clone)
        })
        .collect()
}

/// The PCI bus of one VM.
pub struct PciDevices {
    root: SharedRoot,
    console_input: Option<ConsoleInput>,
}

impl std::fmt::Debug for PciDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciDevices").finish_non_exhaustive()
    }
}

impl PciDevices {
    /// Builds the root complex and puts each device on it with its
    /// interrupts and notify ioeventfds.
    pub fn create(vm: &Arc<VmFd>, mem: &GuestMemory, set: DeviceSet) -> Result<Self, PciError> {
        let router = Arc::new(GsiRouter::new(vm.clone()));
        let io_events: Arc<dyn IoEvents> = Arc::new(KvmIoEvents { vm: vm.clone() });
        let root = Arc::new(Mutex::new(PciRoot::new(vec![(
            PCI_MMIO_START,
            PCI_MMIO_SIZE,
        )])));
        let mut resamplers = Vec::new();
        for spec in set.specs {
            let vectors = spec.device.queue_max_sizes().len() as u32 + 1;
            let msi = kvm_msi(vm, &router, vectors)?;
            let intx = new_eventfd("create an INTx eventfd")?;
            let intx_irqfd = intx
                .try_clone()
                .map_err(|e| PciError::Kvm("create an INTx eventfd", e))?;
            let transport =
                VirtioPciDevice::new(spec.device, mem.clone(), msi, intx, io_events.clone())?;
            let resampler = transport.intx_resampler();
            let slot = root
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add(Box::new(transport))?;
            let gsi = layout::pci_intx_gsi(slot as u32, 0);
            let resample = new_eventfd("create an INTx resample eventfd")?;
            if vm
                .register_irqfd_with_resample(&intx_irqfd, &resample, gsi)
                .is_ok()
            {
                resamplers.push((resample, resampler));
            } else {
                // Without resampling the line is pulsed: still delivered,
                // but a pulse during the guest's handler can be lost.
                vm.register_irqfd(&intx_irqfd, gsi)
                    .map_err(|e| PciError::Kvm("register an INTx irqfd", kvm_io(e)))?;
            }
        }
        for (index, backing) in set.regions.into_iter().enumerate() {
            add_region(vm, &router, &root, index, backing)?;
        }
        if !resamplers.is_empty() {
            spawn_resampler(resamplers)?;
        }
        Ok(Self {
            root,
            console_input: set.console_input,
        })
    }

    /// Where console input goes when the console is virtio (hvc0).
    pub fn console_input(&self) -> Option<InputSink> {
        let input = self.console_input.clone()?;
        Some(Box::new(move |bytes: &[u8]| input.push(bytes)))
    }

    /// Puts the configuration ports on the port bus.
    pub fn attach_io(&self, io_bus: &mut Bus) -> Result<(), PciError> {
        let config_io = Arc::new(Mutex::new(PciConfigIo::new(self.root.clone())));
        io_bus.insert(PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN, config_io)?;
        Ok(())
    }

    /// Puts ECAM and the BAR window on the MMIO bus.
    pub fn attach_mmio(&self, mmio_bus: &mut Bus) -> Result<(), PciError> {
        let ecam = Arc::new(Mutex::new(PciConfigMmio::new(self.root.clone())));
        mmio_bus.insert(PCI_ECAM_START, PCI_ECAM_SIZE, ecam)?;
        let window = PciMmioWindow::new(self.root.clone(), PCI_MMIO_START);
        mmio_bus.insert(PCI_MMIO_START, PCI_MMIO_SIZE, Arc::new(Mutex::new(window)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm() {
        let routes = default_routes();
        // 16 PIC entries and 24 IOAPIC entries.
        assert_eq!(routes.len(), 40);
        let ioapic: Vec<u32> = routes
            .iter()
            // SAFETY: every entry here is an irqchip entry.
            .filter(|r| unsafe { r.u.irqchip.irqchip } == KVM_IRQCHIP_IOAPIC)
            .map(|r| r.gsi)
            .collect();
        assert_eq!(ioapic, (0..24).collect::<Vec<_>>());
    }

    #[test]
    fn msi_entry_splits_the_address() {
        let e = msi_entry(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        assert_eq!((e.gsi, e.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built as an MSI entry.
        let msi = unsafe { e.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }

    #[test]
    fn a_failed_routing_update_is_not_kept_and_is_retried() {
        let mut state = RouterState {
            msi: BTreeMap::new(),
            next_gsi: IOAPIC_PINS,
        };
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        let fail = |_: &KvmIrqRouting| Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        assert!(state.update(24, m, fail).is_err());
        assert!(state.msi.is_empty(), "a route KVM refused was kept");
        // The same message again reaches KVM.
        let mut applied = 0;
        state
            .update(24, m, |routing| {
                applied = routing.as_slice().len();
                Ok(())
            })
            .unwrap();
        assert_eq!(applied, 41);
        assert_eq!(state.msi.get(&24), Some(&m));
        // An unchanged message does not.
        state.update(24, m, fail).unwrap();
    }

    #[test]
    fn a_missing_disk_is_one_line_naming_the_flag() {
        let config = VmConfig {
            disks: vec![DiskConfig {
                path: "/nonexistent/x.img".into(),
                readonly: true,
                rate: Default::default(),
            }],
            ..Default::default()
        };
        let err = devices_from_config(&config).expect_err("an error");
        assert_eq!(
            err.to_string(),
            "--disk path=/nonexistent/x.img,readonly=on"
        );
        let cause = std::error::Error::source(&err)
            .expect("a cause")
            .to_string();
        assert!(cause.contains("/nonexistent/x.img"), "{cause}");
    }
}
