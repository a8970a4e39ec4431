//! agent-suite: runs the agent client suite ([`moat_tests::agent_suite`])
//! against an agent in a VM, through the VM's hybrid vsock socket, and
//! prints one `PASS name` or `FAIL name: why` line per case.
//!
//!   agent-suite UDS PORT ROOTFS [CASE-FILTER]

use std::process::ExitCode;

use moat_tests::agent_suite::{Connector, Suite, Target};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(uds), Some(Ok(port)), Some(rootfs)) = (
        args.first(),
        args.get(1).map(|p| p.parse::<u32>()),
        args.get(2),
    ) else {
        eprintln!("usage: agent-suite UDS PORT ROOTFS [CASE-FILTER]");
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent-suite: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcomes = runtime.block_on(async {
        let suite = Suite::new(Target {
            connector: Connector::Hybrid(uds.clone(), port),
            rootfs: rootfs.clone(),
            state_dir: "/run/moat".into(),
            cgroup_v2: true,
            guest: true,
            prefix: "vm-".into(),
        })?;
        Ok::<_, String>(suite.run_all(args.get(3).map(String::as_str)).await)
    });
    let outcomes = match outcomes {
        Ok(o) => o,
        Err(e) => {
            println!("FAIL connect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = 0;
    for outcome in &outcomes {
        match &outcome.result {
            Ok(()) => println!(
                "PASS {} ({:.1} s)",
                outcome.name,
                outcome.elapsed.as_secs_f64()
            ),
            Err(e) => {
                failed += 1;
                println!("FAIL {}: {e}", outcome.name);
            }
        }
    }
    println!(
        "agent-suite: {} passed, {failed} failed",
        outcomes.len() - failed
    );
    if failed == 0 && !outcomes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
