//! Generates the message types and the ttrpc client and server from
//! protos/agent.proto with pure-Rust codegen (no protoc).

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    println!("cargo:rerun-if-changed=protos/agent.proto");
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    Codegen::new()
        .out_dir(&out_dir)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            gen_mod: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(true))
        .run()
        .expect("ttrpc codegen of protos/agent.proto");
    // lib.rs include!s mod.rs, where an inner attribute is not allowed.
    let mod_rs = std::path::Path::new(&out_dir).join("mod.rs");
    let text = std::fs::read_to_string(&mod_rs).expect("generated mod.rs");
    let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("#![")).collect();
    std::fs::write(&mod_rs, kept.join("\n")).expect("rewrite generated mod.rs");
}
