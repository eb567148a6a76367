//! Generates the protobuf and gRPC code with protox (a protobuf compiler in Rust) and tonic-prost-build, so that
//! building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["moe/v1/expert.proto"];
    println!("cargo:rerun-if-changed=moe");
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        // Payload fields become `bytes::Bytes`: decoding slices the received buffer instead of copying it.
        .bytes(".moe.v1.ForwardRequest.activations")
        .bytes(".moe.v1.PartialSums.sums")
        .compile_fds(descriptors)?;
    Ok(())
}
