//! Host KVM tests of booting: multiboot info and modules, and SMP bring-up.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn multiboot_kernel_starts_with_a_valid_info_pointer() {
    // Checks the magic in EAX and mem_lower, then prints the command line the
    // info structure at EBX points to.
    let code = Asm::default()
        .bytes(&[0x3d])
        .bytes(&0x2bad_b002u32.to_le_bytes()) // cmp eax, magic
        .jump(0x75, "bad")
        .bytes(&[0xf6, 0x03, 0x04]) // test byte [ebx], CMDLINE
        .jump(0x74, "bad")
        // cmp dword [ebx+4], 639: conventional memory up to the EBDA, in KiB.
        .bytes(&[0x81, 0x7b, 0x04])
        .bytes(&639u32.to_le_bytes())
        .jump(0x75, "bad")
        .mov_dx(0x3f8)
        .bytes(&[0x8b, 0x73, 0x10]) // mov esi, [ebx+16]
        .label("next")
        .bytes(&[0x8a, 0x06, 0x84, 0xc0]) // mov al, [esi]; test al, al
        .jump(0x74, "done")
        .out_dx_al()
        .bytes(&[0x46]) // inc esi
        .jump(0xeb, "next")
        .verdict(0x10)
        .finish();
    // GRUB and QEMU put the image's name first: the path as given.
    let kernel = write_temp("cmdline.elf", &multiboot_kernel(0x10_0000, &[], &code, 0));
    let kernel = kernel.to_str().unwrap();
    let args = ["run", "--kernel", kernel, "--memory", "32M"];
    let out = ferrovisor(&[&args[..], &["--cmdline", "root=none tiny=1"]].concat());
    assert_eq!(out.status.code(), Some(0x21), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), format!("{kernel} root=none tiny=1"));
    // With no arguments, the name alone.
    let out = ferrovisor(&[&args[..], &["--cmdline", ""]].concat());
    assert_eq!(out.status.code(), Some(0x21), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), kernel);
}

#[test]
fn initramfs_is_the_first_multiboot_module() {
    let code = Asm::default()
        .bytes(&[0xf6, 0x03, 0x08]) // test byte [ebx], MODS
        .jump(0x74, "bad")
        .bytes(&[0x81, 0x7b, 0x14])
        .bytes(&1u32.to_le_bytes()) // cmp dword [ebx+20], 1
        .jump(0x75, "bad")
        .bytes(&[0x8b, 0x7b, 0x18]) // mov edi, [ebx+24]
        .bytes(&[0x8b, 0x37]) // mov esi, [edi]
        .bytes(&[0x8b, 0x4f, 0x04]) // mov ecx, [edi+4]
        .mov_dx(0x3f8)
        .label("next")
        .bytes(&[0x39, 0xce]) // cmp esi, ecx
        .jump(0x73, "payload_done") // jae payload_done
        .bytes(&[0x8a, 0x06]) // mov al, [esi]
        .out_dx_al()
        .bytes(&[0x46])
        .jump(0xeb, "next")
        // Then the module's string, [edi+8], up to its NUL.
        .label("payload_done")
        .bytes(&[0x8b, 0x77, 0x08]) // mov esi, [edi+8]
        .label("string")
        .bytes(&[0x8a, 0x06, 0x84, 0xc0]) // mov al, [esi]; test al, al
        .jump(0x74, "done")
        .out_dx_al()
        .bytes(&[0x46]) // inc esi
        .jump(0xeb, "string")
        .verdict(0x10)
        .finish();
    let module = write_temp("module.bin", b"module payload\n");
    let module = module.to_str().unwrap();
    let out = boot_tiny(&code, &["--initramfs", module]);
    assert_eq!(out.status.code(), Some(0x21), "stderr: {}", stderr(&out));
    // The payload, then the module's string: its file name.
    assert_eq!(stdout(&out), format!("module payload\n{module}"));
}

#[test]
fn two_vcpus_both_run() {
    // Loaded at 0x10000, below 1 MiB. The application processor starts there
    // in real mode when the boot processor sends it INIT and SIPI (vector
    // 0x10); it prints 'A' and sets a flag the boot processor waits for.
    let ap = [
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'A', 0xee, // mov al, 'A'; out dx, al
        0xc6, 0x06, 0x00, 0x70, 0x01, // mov byte [0x7000], 1
        0xfa, 0xf4, // cli; hlt
    ];
    let bsp = Asm::default()
        .print("B")
        .store32(0xfee0_00f0, 0x1ff) // enable the local APIC
        .store32(0xfee0_0310, 1 << 24) // ICR destination: APIC id 1
        .store32(0xfee0_0300, 0x4500) // INIT
        .store32(0xfee0_0300, 0x4610) // SIPI, vector 0x10
        .label("wait")
        .bytes(&[0x80, 0x3d, 0x00, 0x70, 0x00, 0x00, 0x01]) // cmp byte [0x7000], 1
        .jump(0x75, "wait")
        .print("\n")
        .debug_exit(0x40)
        .finish();
    let kernel = write_temp("smp.elf", &multiboot_kernel(0x1_0000, &ap, &bsp, 0));
    let out = ferrovisor(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        "32M",
    ]);
    assert_eq!(out.status.code(), Some(0x81), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "BA\n");
}
