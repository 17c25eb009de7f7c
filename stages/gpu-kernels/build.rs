//! With the `cuda` feature, compiles every kernel file in cuda/ to PTX with nvcc (found through
//! $NVCC, else $CUDA_HOME/bin/nvcc, else PATH; scripts/build-cuda.sh sets them). Without the
//! feature nothing runs, so CPU builds need no CUDA.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(h) => format!("{h}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut names: Vec<String> = std::fs::read_dir("cuda")
        .expect("cuda/ kernel folder")
        .filter_map(|e| {
            let p = e.ok()?.path();
            if p.extension()? != "cu" {
                return None;
            }
            Some(p.file_stem()?.to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    for name in names {
        let src = format!("cuda/{name}.cu");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}")])
            .arg(&src)
            .arg("-o")
            .arg(out_dir.join(format!("{name}.ptx")))
            .status()
            .unwrap_or_else(|e| panic!("cannot run nvcc ({nvcc}): {e}; set NVCC or CUDA_HOME"));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
