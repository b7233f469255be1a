//! Generates the ONNX protobuf types from the vendored `proto/onnx.proto` with prost. protox compiles
//! the schema in pure Rust, so building Shrink needs no `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let descriptors = protox::compile(["proto/onnx.proto"], ["proto"])?;
    prost_build::Config::new()
        // Weights stay zero-copy slices of the uploaded file (memory-mapped) instead of heap copies.
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
