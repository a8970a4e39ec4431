//! The agent's request parsing with every byte chosen by the fuzzer: the
//! protobuf decoding of each AgentService request, the unknown-field
//! check, and the OCI JSON, ID, address and MAC parsing behind it. What
//! a shim (or anything that reaches the vsock port) sends lands here
//! first; none of it may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_agent::engine::{check_id, parse_process, parse_resources, parse_spec};
use moat_agent::guest::{parse_cidr, parse_mac};
use moat_agent::service::known_fields;
use moat_protocol::agent::*;
use protobuf::Message;

fn decode<M: Message + protobuf::MessageFull>(bytes: &[u8]) -> Option<M> {
    let message = M::parse_from_bytes(bytes).ok()?;
    let _ = known_fields("fuzz", &message);
    Some(message)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 8 {
        0 => {
            if let Some(req) = decode::<CreateContainerRequest>(bytes) {
                let _ = check_id("container ID", &req.container_id);
                let _ = parse_spec(&req.oci_spec_json, req.terminal);
                for m in req.rootfs.iter().chain(req.mounts.iter()) {
                    let _ = known_fields("fuzz", m);
                }
            }
        }
        1 => {
            if let Some(req) = decode::<ExecProcessRequest>(bytes) {
                let _ = check_id("exec ID", &req.exec_id);
                let _ = parse_process(&req.oci_process_json, req.terminal);
            }
        }
        2 => {
            if let Some(req) = decode::<UpdateContainerRequest>(bytes) {
                let _ = parse_resources(&req.oci_resources_json);
            }
        }
        3 => {
            if let Some(req) = decode::<UpdateInterfaceRequest>(bytes) {
                if let Some(interface) = req.interface.as_ref() {
                    let _ = parse_mac(&interface.mac);
                    for address in &interface.addresses {
                        let _ = parse_cidr("address", address);
                    }
                }
            }
        }
        4 => {
            if let Some(req) = decode::<UpdateRoutesRequest>(bytes) {
                for route in &req.routes {
                    let _ = parse_cidr("route", &route.destination);
                }
            }
        }
        5 => {
            let _ = decode::<WriteStreamRequest>(bytes);
            let _ = decode::<ReadStreamRequest>(bytes);
        }
        6 => {
            let _ = decode::<SignalProcessRequest>(bytes);
            let _ = decode::<TtyWinResizeRequest>(bytes);
            let _ = decode::<SetDnsRequest>(bytes);
        }
        _ => {
            // The OCI documents on their own, without a protobuf wrapper.
            let _ = parse_spec(bytes, false);
            let _ = parse_process(bytes, true);
            let _ = parse_resources(bytes);
        }
    }
});
