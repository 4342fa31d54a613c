//! Compiles `proto/tokenmeter/v1/*.proto` with a vendored `protoc`, so a build needs no
//! system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut prost_config = tonic_prost_build::Config::new();
    prost_config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    let dir = PathBuf::from("proto/tokenmeter/v1");
    let mut protos: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    protos.sort();
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .generate_default_stubs(true)
        .file_descriptor_set_path(out_dir.join("tokenmeter_descriptor.bin"))
        .compile_with_config(prost_config, &protos, &includes)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
