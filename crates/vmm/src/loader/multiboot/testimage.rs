//! A tiny multiboot kernel for boot tests on real KVM.
//!
//! [`tiny_multiboot_kernel`] builds a complete multiboot kernel of well under
//! 4 KiB. Its 32-bit code checks the boot magic in `EAX`, prints what it
//! finds in the information structure at `EBX` as one line on the first
//! serial port (port 0x3f8, written with `out dx, al`, no status polling),
//! then writes a status byte to the debug-exit port (0xf4) and halts forever
//! with interrupts off.
//!
//! # What the guest prints
//!
//! When `EAX` holds [`MULTIBOOT_BOOTLOADER_MAGIC`], exactly this line (`%08x` is
//! eight lower-case hex digits):
//!
//! ```text
//! MB magic=ok info=%08x flags=%08x lower=%08x upper=%08x mods=%08x cmdline="%s" loader="%s"
//! ```
//!
//! followed, only when the `MODS` info flag is set and `mods_count` is not 0, by
//!
//! ```text
//!  mod0="%s" mod0data=%08x
//! ```
//!
//! and then `\n`. The fields are `EBX`, then the info structure's `flags`,
//! `mem_lower`, `mem_upper` and `mods_count`, its `cmdline` string (empty
//! unless the `CMDLINE` flag is set), its `boot_loader_name` string (empty
//! unless that flag is set), the first module's string, and the first four
//! bytes of the first module's data read as a little-endian `u32`. After the
//! line the guest writes [`TEST_KERNEL_EXIT_OK`] to the debug-exit port.
//!
//! When `EAX` holds anything else, the guest touches no memory through `EBX`
//! and prints `MB magic=bad eax=%08x\n`, then writes
//! [`TEST_KERNEL_EXIT_BAD_MAGIC`] to the debug-exit port.
//!
//! [`parse_report`] turns that output back into a [`TestKernelOutput`].
//!
//! # Memory it uses
//!
//! The file maps one to one onto guest memory from `load_addr`; with its
//! stack (zeroed bss) the kernel occupies fewer than [`TEST_KERNEL_MAX_SIZE`]
//! bytes from `load_addr`. It sets up its own stack there and uses no other
//! memory than that and the info structure.

use super::{
    HEADER_FLAG_ADDRESS, HEADER_FLAG_MEMORY_INFO, HEADER_FLAG_PAGE_ALIGN,
    MULTIBOOT_BOOTLOADER_MAGIC, MULTIBOOT_HEADER_MAGIC,
};

/// The port the test kernel prints on (COM1's data register).
pub const TEST_KERNEL_SERIAL_PORT: u16 = 0x3f8;
/// The port the test kernel writes its status byte to (`isa-debug-exit`).
pub const TEST_KERNEL_EXIT_PORT: u16 = 0xf4;
/// Status byte after a good boot.
pub const TEST_KERNEL_EXIT_OK: u8 = 0;
/// Status byte when `EAX` did not hold the boot magic.
pub const TEST_KERNEL_EXIT_BAD_MAGIC: u8 = 1;
/// The kernel, stack included, stays below `load_addr + TEST_KERNEL_MAX_SIZE`.
pub const TEST_KERNEL_MAX_SIZE: u32 = 0x1000;

/// Where the multiboot header sits in the file.
const HEADER_OFFSET: usize = 0x60;
/// Where the code starts in the file; the entry point is `load_addr + CODE_OFFSET`.
const CODE_OFFSET: usize = 0x80;
const STACK_SIZE: usize = 0x400;

/// How the test kernel tells the loader where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestKernelFormat {
    /// An ELF32 (i386) executable with one `PT_LOAD` segment, file bytes plus
    /// bss, loaded at `load_addr`.
    Elf32,
    /// A flat image whose multiboot header carries the address fields (flag
    /// bit 16) and no ELF header at all.
    AoutKludge,
}

/// Builds the test kernel, linked to run at physical `load_addr`.
///
/// `load_addr` should be page aligned, at least 0x1000, and such that the
/// kernel (fewer than [`TEST_KERNEL_MAX_SIZE`] bytes) clears the multiboot
/// info area. A load address below 1 MiB exercises low loading.
pub fn tiny_multiboot_kernel(format: TestKernelFormat, load_addr: u32) -> Vec<u8> {
    let code = assemble(load_addr.wrapping_add(CODE_OFFSET as u32));
    let mut image = vec![0u8; CODE_OFFSET];
    image.extend_from_slice(&code);
    image.resize(image.len().next_multiple_of(16), 0);
    let file_len = image.len() as u32;
    let mem_len = file_len + STACK_SIZE as u32;
    let entry = load_addr.wrapping_add(CODE_OFFSET as u32);

    let mut flags = HEADER_FLAG_PAGE_ALIGN | HEADER_FLAG_MEMORY_INFO;
    let mut header = Vec::new();
    if format == TestKernelFormat::AoutKludge {
        flags |= HEADER_FLAG_ADDRESS;
    }
    for word in [
        MULTIBOOT_HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC.wrapping_add(flags)),
    ] {
        header.extend_from_slice(&word.to_le_bytes());
    }
    match format {
        TestKernelFormat::AoutKludge => {
            for word in [
                load_addr.wrapping_add(HEADER_OFFSET as u32), // header_addr
                load_addr,                                    // load_addr
                load_addr.wrapping_add(file_len),             // load_end_addr
                load_addr.wrapping_add(mem_len),              // bss_end_addr
                entry,                                        // entry_addr
            ] {
                header.extend_from_slice(&word.to_le_bytes());
            }
        }
        TestKernelFormat::Elf32 => {
            image[..ELF_HEADERS_LEN]
                .copy_from_slice(&elf32_headers(load_addr, entry, file_len, mem_len));
        }
    }
    image[HEADER_OFFSET..HEADER_OFFSET + header.len()].copy_from_slice(&header);
    image
}

/// ELF header (52 bytes) and one program header (32 bytes).
const ELF_HEADERS_LEN: usize = 52 + 32;

fn elf32_headers(load_addr: u32, entry: u32, file_len: u32, mem_len: u32) -> Vec<u8> {
    let mut h = vec![0x7f, b'E', b'L', b'F', 1, 1, 1];
    h.resize(16, 0);
    let half = |h: &mut Vec<u8>, v: u16| h.extend_from_slice(&v.to_le_bytes());
    let word = |h: &mut Vec<u8>, v: u32| h.extend_from_slice(&v.to_le_bytes());
    half(&mut h, 2); // e_type: ET_EXEC
    half(&mut h, 3); // e_machine: EM_386
    word(&mut h, 1); // e_version
    word(&mut h, entry); // e_entry
    word(&mut h, 52); // e_phoff
    word(&mut h, 0); // e_shoff
    word(&mut h, 0); // e_flags
    half(&mut h, 52); // e_ehsize
    half(&mut h, 32); // e_phentsize
    half(&mut h, 1); // e_phnum
    half(&mut h, 40); // e_shentsize
    half(&mut h, 0); // e_shnum
    half(&mut h, 0); // e_shstrndx
    word(&mut h, 1); // p_type: PT_LOAD
    word(&mut h, 0); // p_offset: the whole file
    word(&mut h, load_addr); // p_vaddr
    word(&mut h, load_addr); // p_paddr
    word(&mut h, file_len); // p_filesz
    word(&mut h, mem_len); // p_memsz: the rest is the stack
    word(&mut h, 7); // p_flags: read, write, execute
    word(&mut h, 4); // p_align
    h
}

/// What a relocation patches.
#[derive(Debug, Clone, Copy)]
enum Fix {
    /// A signed 8-bit displacement from the end of the field.
    Rel8,
    /// A signed 32-bit displacement from the end of the field.
    Rel32,
    /// A 32-bit absolute address.
    Abs32,
}

/// A minimal 32-bit assembler: raw bytes plus label fixups.
#[derive(Debug)]
struct Asm {
    /// Guest address of the first byte.
    base: u32,
    bytes: Vec<u8>,
    labels: Vec<(&'static str, usize)>,
    fixups: Vec<(usize, &'static str, Fix)>,
}

impl Asm {
    fn new(base: u32) -> Self {
        Asm {
            base,
            bytes: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.bytes.len()));
    }

    fn fixup(&mut self, fix: Fix, target: &'static str) {
        self.fixups.push((self.bytes.len(), target, fix));
        let len = match fix {
            Fix::Rel8 => 1,
            Fix::Rel32 | Fix::Abs32 => 4,
        };
        self.bytes.resize(self.bytes.len() + len, 0);
    }

    /// `call target`
    fn call(&mut self, target: &'static str) {
        self.emit(&[0xe8]);
        self.fixup(Fix::Rel32, target);
    }

    /// A short conditional or unconditional jump (`opcode` is 0x74 `jz`,
    /// 0x75 `jnz`, 0x72 `jb`, 0xeb `jmp`).
    fn jump8(&mut self, opcode: u8, target: &'static str) {
        self.emit(&[opcode]);
        self.fixup(Fix::Rel8, target);
    }

    /// `mov ebx, <address of string>; call puts`
    fn print(&mut self, string: &'static str) {
        self.emit(&[0xbb]);
        self.fixup(Fix::Abs32, string);
        self.call("puts");
    }

    /// A NUL-terminated string.
    fn string(&mut self, name: &'static str, text: &str) {
        self.label(name);
        self.emit(text.as_bytes());
        self.emit(&[0]);
    }

    /// Resolves the fixups. The code is fixed, so a bad label or a short jump
    /// out of range is a bug in this file, caught by its unit test.
    fn finish(mut self) -> Vec<u8> {
        for &(at, target, fix) in &self.fixups {
            let (_, pos) = *self
                .labels
                .iter()
                .find(|(name, _)| *name == target)
                .expect("test kernel: undefined label");
            match fix {
                Fix::Rel8 => {
                    let rel = pos as isize - (at as isize + 1);
                    let rel = i8::try_from(rel).expect("test kernel: short jump out of range");
                    self.bytes[at] = rel as u8;
                }
                Fix::Rel32 => {
                    let rel = (pos as i32).wrapping_sub(at as i32 + 4);
                    self.bytes[at..at + 4].copy_from_slice(&rel.to_le_bytes());
                }
                Fix::Abs32 => {
                    let addr = self.base.wrapping_add(pos as u32);
                    self.bytes[at..at + 4].copy_from_slice(&addr.to_le_bytes());
                }
            }
        }
        self.bytes
    }
}

/// The kernel's code and strings, to run at `base`.
fn assemble(base: u32) -> Vec<u8> {
    let mut a = Asm::new(base);
    a.emit(&[0xfa, 0xfc]); // cli; cld
    a.emit(&[0xbc]); // mov esp, stack_top
    a.fixup(Fix::Abs32, "stack_top");
    a.emit(&[0x89, 0xc6]); // mov esi, eax
    a.emit(&[0x89, 0xdf]); // mov edi, ebx
    let [port_lo, port_hi] = TEST_KERNEL_SERIAL_PORT.to_le_bytes();
    a.emit(&[0x66, 0xba, port_lo, port_hi]); // mov dx, 0x3f8
    a.print("s_magic");
    a.emit(&[0x81, 0xfe]); // cmp esi, MULTIBOOT_BOOTLOADER_MAGIC
    a.emit(&MULTIBOOT_BOOTLOADER_MAGIC.to_le_bytes());
    a.emit(&[0x0f, 0x85]); // jne bad
    a.fixup(Fix::Rel32, "bad");
    a.print("s_ok");
    a.emit(&[0x89, 0xf8]); // mov eax, edi
    a.call("puthex");
    for (string, field) in [
        ("s_flags", 0u8),
        ("s_lower", 4),
        ("s_upper", 8),
        ("s_mods", 20),
    ] {
        a.print(string);
        a.emit(&[0x8b, 0x47, field]); // mov eax, [edi + field]
        a.call("puthex");
    }
    a.print("s_cmdline");
    a.emit(&[0xf6, 0x07, 0x04]); // test byte [edi], CMDLINE
    a.jump8(0x74, "no_cmdline");
    a.emit(&[0x8b, 0x5f, 16]); // mov ebx, [edi + 16]
    a.call("puts");
    a.label("no_cmdline");
    a.print("s_loader");
    a.emit(&[0xf6, 0x47, 0x01, 0x02]); // test byte [edi + 1], BOOT_LOADER_NAME >> 8
    a.jump8(0x74, "no_loader");
    a.emit(&[0x8b, 0x5f, 64]); // mov ebx, [edi + 64]
    a.call("puts");
    a.label("no_loader");
    a.print("s_quote");
    a.emit(&[0xf6, 0x07, 0x08]); // test byte [edi], MODS
    a.jump8(0x74, "done");
    a.emit(&[0x83, 0x7f, 20, 0]); // cmp dword [edi + 20], 0
    a.jump8(0x74, "done");
    a.print("s_mod0");
    a.emit(&[0x8b, 0x4f, 24]); // mov ecx, [edi + 24]   (mods_addr)
    a.emit(&[0x8b, 0x59, 8]); // mov ebx, [ecx + 8]     (string)
    a.call("puts");
    a.print("s_mod0data");
    a.emit(&[0x8b, 0x01]); // mov eax, [ecx]            (mod_start)
    a.emit(&[0x8b, 0x00]); // mov eax, [eax]
    a.call("puthex");
    a.label("done");
    a.print("s_newline");
    a.emit(&[0xb0, TEST_KERNEL_EXIT_OK]); // mov al, TEST_KERNEL_EXIT_OK
    a.emit(&[0xe6, TEST_KERNEL_EXIT_PORT as u8]); // out 0xf4, al
    a.jump8(0xeb, "halt");

    a.label("bad");
    a.print("s_bad");
    a.emit(&[0x89, 0xf0]); // mov eax, esi
    a.call("puthex");
    a.print("s_newline");
    a.emit(&[0xb0, TEST_KERNEL_EXIT_BAD_MAGIC]); // mov al, TEST_KERNEL_EXIT_BAD_MAGIC
    a.emit(&[0xe6, TEST_KERNEL_EXIT_PORT as u8]); // out 0xf4, al
    a.label("halt");
    a.emit(&[0xfa, 0xf4]); // cli; hlt
    a.jump8(0xeb, "halt");

    emit_routines(&mut a);

    a.string("s_magic", "MB magic=");
    a.string("s_ok", "ok info=");
    a.string("s_bad", "bad eax=");
    a.string("s_flags", " flags=");
    a.string("s_lower", " lower=");
    a.string("s_upper", " upper=");
    a.string("s_mods", " mods=");
    a.string("s_cmdline", " cmdline=\"");
    a.string("s_loader", "\" loader=\"");
    a.string("s_quote", "\"");
    a.string("s_mod0", " mod0=\"");
    a.string("s_mod0data", "\" mod0data=");
    a.string("s_newline", "\n");
    let stack_top = (CODE_OFFSET + a.bytes.len()).next_multiple_of(16) + STACK_SIZE;
    a.labels.push(("stack_top", stack_top - CODE_OFFSET));
    a.finish()
}

/// `puts` prints the NUL-terminated string at `ebx` (clobbers `al`, `ebx`);
/// `puthex` prints `eax` as eight hex digits (clobbers `eax`). Both write
/// to the port in `dx`.
fn emit_routines(a: &mut Asm) {
    a.label("puts");
    a.emit(&[0x8a, 0x03]); // mov al, [ebx]
    a.emit(&[0x84, 0xc0]); // test al, al
    a.jump8(0x74, "puts_done");
    a.emit(&[0xee]); // out dx, al
    a.emit(&[0x43]); // inc ebx
    a.jump8(0xeb, "puts");
    a.label("puts_done");
    a.emit(&[0xc3]); // ret

    a.label("puthex");
    a.emit(&[0x51]); // push ecx
    a.emit(&[0xb9, 8, 0, 0, 0]); // mov ecx, 8
    a.label("puthex_loop");
    a.emit(&[0xc1, 0xc0, 4]); // rol eax, 4
    a.emit(&[0x50]); // push eax
    a.emit(&[0x24, 0x0f]); // and al, 0xf
    a.emit(&[0x3c, 10]); // cmp al, 10
    a.jump8(0x72, "puthex_digit");
    a.emit(&[0x04, b'a' - b'0' - 10]); // add al, 'a' - '0' - 10
    a.label("puthex_digit");
    a.emit(&[0x04, b'0']); // add al, '0'
    a.emit(&[0xee]); // out dx, al
    a.emit(&[0x58]); // pop eax
    a.emit(&[0x49]); // dec ecx
    a.jump8(0x75, "puthex_loop");
    a.emit(&[0x59]); // pop ecx
    a.emit(&[0xc3]); // ret
}

/// What the test kernel printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestKernelOutput {
    /// `EAX` held the boot magic; the fields come from the info structure.
    Booted(TestKernelReport),
    /// `EAX` held something else.
    BadMagic { eax: u32 },
}

/// The info structure as the test kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestKernelReport {
    pub info_addr: u32,
    pub flags: u32,
    pub mem_lower: u32,
    pub mem_upper: u32,
    pub mods_count: u32,
    pub cmdline: String,
    pub loader: String,
    /// The first module's string and its first four data bytes (little-endian).
    pub mod0: Option<(String, u32)>,
}

/// Finds the test kernel's line in `output` (serial output, possibly with
/// other text around it) and parses it. `None` if there is no complete line.
pub fn parse_report(output: &str) -> Option<TestKernelOutput> {
    let start = output.find("MB magic=")?;
    let line = output[start..].split('\n').next()?;
    // The line must be complete: the newline must have arrived.
    if !output[start..].contains('\n') {
        return None;
    }
    let mut p = Parser(line);
    p.literal("MB magic=")?;
    if p.literal("bad eax=").is_some() {
        let eax = p.hex()?;
        return p.0.is_empty().then_some(TestKernelOutput::BadMagic { eax });
    }
    p.literal("ok info=")?;
    let info_addr = p.hex()?;
    p.literal(" flags=")?;
    let flags = p.hex()?;
    p.literal(" lower=")?;
    let mem_lower = p.hex()?;
    p.literal(" upper=")?;
    let mem_upper = p.hex()?;
    p.literal(" mods=")?;
    let mods_count = p.hex()?;
    p.literal(" cmdline=\"")?;
    let cmdline = p.until("\" loader=\"")?;
    let loader = p.until("\"")?;
    let mod0 = if p.literal(" mod0=\"").is_some() {
        let name = p.until("\" mod0data=")?;
        Some((name, p.hex()?))
    } else {
        None
    };
    p.0.is_empty()
        .then_some(TestKernelOutput::Booted(TestKernelReport {
            info_addr,
            flags,
            mem_lower,
            mem_upper,
            mods_count,
            cmdline,
            loader,
            mod0,
        }))
}

/// The unparsed rest of a line.
#[derive(Debug)]
struct Parser<'a>(&'a str);

impl Parser<'_> {
    fn literal(&mut self, lit: &str) -> Option<()> {
        self.0 = self.0.strip_prefix(lit)?;
        Some(())
    }

    fn hex(&mut self) -> Option<u32> {
        let digits = self.0.get(..8)?;
        let value = u32::from_str_radix(digits, 16).ok()?;
        self.0 = &self.0[8..];
        Some(value)
    }

    /// Takes the text up to `end`, and `end` itself.
    fn until(&mut self, end: &str) -> Option<String> {
        let at = self.0.find(end)?;
        let text = self.0[..at].to_string();
        self.0 = &self.0[at + end.len()..];
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::super::probe;
    use super::*;

    #[test]
    fn kernel_fits_its_budget_and_has_a_header() {
        for format in [TestKernelFormat::Elf32, TestKernelFormat::AoutKludge] {
            let image = tiny_multiboot_kernel(format, 0x10_0000);
            assert!(image.len() + STACK_SIZE < TEST_KERNEL_MAX_SIZE as usize);
            let header = probe(&image).expect("header");
            assert_eq!(header.offset, HEADER_OFFSET);
            assert_eq!(
                header.has_address_fields(),
                format == TestKernelFormat::AoutKludge
            );
        }
    }

    #[test]
    fn parses_a_good_report() {
        let out = "junk\nMB magic=ok info=00030000 flags=0000024d lower=0000027f \
                   upper=0003fc00 mods=00000001 cmdline=\"a b\" loader=\"ferrovisor\" \
                   mod0=\"m x\" mod0data=44434241\nmore";
        let want = TestKernelReport {
            info_addr: 0x30000,
            flags: 0x24d,
            mem_lower: 0x27f,
            mem_upper: 0x3fc00,
            mods_count: 1,
            cmdline: "a b".into(),
            loader: "ferrovisor".into(),
            mod0: Some(("m x".into(), 0x4443_4241)),
        };
        assert_eq!(parse_report(out), Some(TestKernelOutput::Booted(want)));
    }

    #[test]
    fn parses_a_bad_magic_report_and_rejects_partial_lines() {
        assert_eq!(
            parse_report("MB magic=bad eax=deadbeef\n"),
            Some(TestKernelOutput::BadMagic { eax: 0xdead_beef })
        );
        assert_eq!(parse_report("MB magic=ok info=0003"), None);
    }
}
