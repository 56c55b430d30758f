//! Generates the airlock.v1 client and server code, and a file descriptor set for gRPC reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("airlock_descriptor.bin"))
        // For `airlockctl --json`.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(
            &[
                "proto/airlock/v1/agent.proto",
                "proto/airlock/v1/approval.proto",
                "proto/airlock/v1/control.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
