//! The `webcall` binary runs on any glibc Linux without extra packages: its ELF dynamic section asks for nothing
//! beyond glibc's own libraries (no libvpx, no libssl, ...). Reads the binary this test run built; building it with
//! `PKG_CONFIG=/bin/false` (no system library can be found) is what the default features must survive.

/// glibc's libraries and the loader: on every glibc system, not packages to install.
const GLIBC: &[&str] =
    &["libc.so", "libm.so", "libgcc_s.so", "ld-linux", "libpthread.so", "libdl.so", "librt.so", "libutil.so"];

#[test]
fn the_binary_needs_only_glibc() {
    let path = env!("CARGO_BIN_EXE_webcall");
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let elf = goblin::elf::Elf::parse(&bytes).unwrap_or_else(|e| panic!("{path} is not an ELF file: {e}"));
    assert!(elf.dynamic.is_some(), "{path}: no dynamic section");
    assert!(elf.libraries.contains(&"libc.so.6"), "{path}: links glibc dynamically: {:?}", elf.libraries);
    let other: Vec<&str> =
        elf.libraries.iter().copied().filter(|lib| !GLIBC.iter().any(|g| lib.starts_with(g))).collect();
    assert!(
        other.is_empty(),
        "{path} needs shared libraries beyond glibc's: {other:?} (all NEEDED: {:?}); the default build must link \
         only what it builds from crates.io sources (libvpx is behind the `libvpx` feature)",
        elf.libraries
    );
    // Nothing is loaded from a path baked into the binary either.
    assert!(
        elf.rpaths.is_empty() && elf.runpaths.is_empty(),
        "{path}: rpath {:?} runpath {:?}",
        elf.rpaths,
        elf.runpaths
    );
}

/// `webcall --version` names the commit the binary was built from (build.rs), or "unknown" outside a checkout.
#[test]
fn version_names_the_commit() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_webcall")).arg("--version").output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(line.trim(), format!("webcall {} ({commit})", env!("CARGO_PKG_VERSION")));
}
