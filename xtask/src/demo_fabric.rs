//! `cargo xtask demo --fabric`: two guests talking over a Ferrovisor
//! switch. A daemon brings up a system file with a learning bridge and two
//! guest-kit guests on VLAN 10 of it; beta pings alpha and streams TCP to
//! it; the demo then shows beta's console, the switch's ports and counters
//! (`ferrovisor switch show lan`) and beta's `info`, and stops everything.
//! On a PVM host it all runs inside the lab.

use std::path::Path;
use std::process::Command;

use crate::demo::Host;
use crate::guestkit::{self, Kit};
use crate::lab::{self, Spec, LAB_INITRAMFS, LAB_KERNEL};
use crate::util::{self, Context, Result};

/// Where the demo's daemon keeps its socket, state and system file.
const DIR: &str = "/tmp/ferrovisor-fabric-demo";

/// What alpha runs: an address on the switch, then a TCP sink.
const ALPHA: &str = "ip link set eth0 up && ip addr add 10.0.77.1/24 dev eth0 && \
                     echo 'alpha: 10.0.77.1 on switch lan, VLAN 10' && netbench serve 7000";

/// What beta runs: ping alpha until it answers, then TCP throughput and
/// round trips through the switch; then it stays up, so that its port
/// (which goes with it) shows in the switch's table.
const BETA: &str = "ip link set eth0 up && ip addr add 10.0.77.2/24 dev eth0 && \
                    echo 'beta: 10.0.77.2 on switch lan, VLAN 10' && \
                    for i in $(seq 60); do ping -c 1 -W 1 10.0.77.1 >/dev/null && break; sleep 1; done; \
                    ping -c 3 10.0.77.1; netbench stream 10.0.77.1 7000 3; \
                    netbench rr 10.0.77.1 7000 200 64; echo demo-done; sleep 600";

/// The system file: the switch and both guests, booting `kernel` and
/// `initramfs`.
fn system_file(kernel: &str, initramfs: &str) -> String {
    let guest = |name: &str, mac: &str, run: &str| {
        format!(
            "[guests.{name}]\nkernel = \"{kernel}\"\ninitramfs = \"{initramfs}\"\n\
             cmdline = \"{}\"\ncpus = 1\nmemory = \"256M\"\n\n\
             [[guests.{name}.net]]\nswitch = \"lan\"\nvlan = 10\nmac = \"{mac}\"\n\n",
            guestkit::cmdline_running(run)
        )
    };
    format!(
        "[switches.lan]\nmode = \"bridge\"\n\n{}{}",
        guest("alpha", "52:54:00:77:00:01", ALPHA),
        guest("beta", "52:54:00:77:00:02", BETA)
    )
}

/// The shell script that runs the demo with the binary `bin` and guest
/// files under `images`.
fn script(bin: &str, kernel: &str, initramfs: &str, images: &str) -> String {
    let system = system_file(kernel, initramfs);
    format!(
        "set -u\nrm -rf {DIR}; mkdir -p {DIR}\n\
         cat > {DIR}/system.toml <<'SYSTEM'\n{system}SYSTEM\n\
         fv() {{ {bin} \"$@\" --socket {DIR}/api.sock; }}\n\
         {bin} daemon --socket {DIR}/api.sock --state-dir {DIR}/state --images {images} \
         >{DIR}/daemon.log 2>&1 &\n\
         daemon=$!\n\
         for i in $(seq 100); do fv list >/dev/null 2>&1 && break; sleep 0.2; done\n\
         echo '--- ferrovisor up system.toml'\n\
         fv up {DIR}/system.toml || {{ cat {DIR}/daemon.log; exit 1; }}\n\
         status=1\n\
         for i in $(seq 300); do\n\
           if fv console beta --log 2>/dev/null | grep -q demo-done; then status=0; break; fi\n\
           sleep 1\n\
         done\n\
         echo '--- beta console'\n\
         fv console beta --log | grep -v '^\\[' | tail -n 20\n\
         echo '--- ferrovisor switch show lan'\n\
         fv switch show lan\n\
         echo '--- ferrovisor info beta (its port)'\n\
         fv info beta | grep -E '^(name|state|ram|switch) '\n\
         fv kill alpha >/dev/null 2>&1; fv kill beta >/dev/null 2>&1\n\
         fv switch delete lan >/dev/null\n\
         kill $daemon\n\
         exit $status\n"
    )
}

/// Runs the demo: inside the lab on a PVM host, directly otherwise.
pub fn run(host: Host, kit: &Kit, ferrovisor: &Path) -> Result<u8> {
    eprintln!(
        "demo: two guests on a Ferrovisor switch (a learning bridge, VLAN 10); \
         beta pings alpha and streams TCP to it"
    );
    if host == Host::Hardware {
        let images = kit
            .vmlinuz
            .parent()
            .ok_or_else(|| fail!("the kit's kernel has no directory"))?;
        let text = script(
            &util::shell_quote(&ferrovisor.to_string_lossy()),
            &kit.vmlinuz.to_string_lossy(),
            &kit.initramfs.to_string_lossy(),
            &util::shell_quote(&images.to_string_lossy()),
        );
        let status = Command::new("sh")
            .args(["-c", &text])
            .status()
            .ctx(|| "cannot run the demo's script".to_string())?;
        return Ok(u8::try_from(status.code().unwrap_or(1).clamp(0, 255)).unwrap_or(1));
    }
    let images = Path::new(LAB_KERNEL)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut spec = Spec::new(Some(script(
        "\"$FERROVISOR_BIN\"",
        LAB_KERNEL,
        LAB_INITRAMFS,
        &images,
    )));
    spec.deadline = std::time::Duration::from_secs(15 * 60);
    let outcome = lab::run(&spec, kit, Some(ferrovisor))?;
    Ok(u8::try_from(outcome.status.clamp(0, 255)).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_system_puts_both_guests_on_one_vlan_of_the_switch() {
        let text = system_file("/k", "/i");
        assert!(text.starts_with("[switches.lan]\nmode = \"bridge\""));
        assert_eq!(text.matches("switch = \"lan\"\nvlan = 10").count(), 2);
        assert!(text.contains("[guests.alpha]") && text.contains("[guests.beta]"));
    }
}
