//! Generate bindings to the installed libfabric, and compile C wrappers for its static
//! inline calls (`fi_write`, `fi_cq_read`, `fi_mr_reg`, ... are inline functions that
//! call through the provider's operation tables; bindgen wraps each in a real symbol).
//! The library itself is not linked: `loader.c` loads it on first use (why is there).
//!
//! Without libfabric (no `libfabric.pc`), nothing is generated and the crate is empty
//! but for `AVAILABLE = false`: the dataplane then reports the RMA transport missing.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=loader.c");
    println!("cargo:rustc-check-cfg=cfg(dwcp_libfabric)");
    println!("cargo:rerun-if-env-changed=DWCP_NO_LIBFABRIC");
    if std::env::var_os("DWCP_NO_LIBFABRIC").is_some_and(|v| v == "1") {
        // The build of a machine without libfabric, on one with it: the stub's API
        // must keep up with the real one.
        println!("cargo:warning=DWCP_NO_LIBFABRIC=1: RMA left out");
        return;
    }
    let library = match pkg_config::Config::new()
        .atleast_version("1.11")
        // Headers only: the library is loaded at run time (loader.c), not linked.
        .cargo_metadata(false)
        .probe("libfabric")
    {
        Ok(library) => library,
        Err(e) => {
            // One line: cargo shows a warning's first line only.
            let why = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            println!(
                "cargo:warning=libfabric not found, RMA left out (install libfabric-dev): {why}"
            );
            return;
        }
    };
    println!("cargo:rustc-cfg=dwcp_libfabric");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let wrappers = out.join("static_wrappers");
    let includes: Vec<String> = library
        .include_paths
        .iter()
        .map(|p| format!("-I{}", p.display()))
        .collect();
    let bindings = bindgen::Builder::default()
        .header(manifest.join("wrapper.h").display().to_string())
        .clang_args(&includes)
        .allowlist_function("fi_.*")
        .allowlist_type("fi_.*|fid.*")
        .allowlist_var("FI_.*")
        .derive_default(true)
        .wrap_static_fns(true)
        .wrap_static_fns_path(&wrappers)
        .generate()
        .expect("bindgen reads libfabric's headers");
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing the bindings");
    cc::Build::new()
        .file(wrappers.with_extension("c"))
        .file(manifest.join("loader.c"))
        .include(&manifest)
        .includes(&library.include_paths)
        .warnings(false)
        .compile("dwcp_fabric_wrappers");
}
