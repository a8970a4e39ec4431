//! moat-agent: `/init` of the pod VM's initramfs, or, with `--listen
//! unix:PATH`, the same service on the host for tests.

use std::process::ExitCode;
use std::sync::Arc;

use moat_agent::init::{mount_early_filesystems, set_hostname, spawn_orphan_reaper};
use moat_agent::service::Agent;
use moat_agent::settings::Settings;
use moat_protocol::agent_ttrpc::create_agent_service;

fn address(args: &[String]) -> Result<String, String> {
    match args {
        [] => {
            let cmdline = std::fs::read_to_string("/proc/cmdline")
                .map_err(|e| format!("/proc/cmdline: {e}"))?;
            let settings = Settings::from_cmdline(&cmdline).map_err(|e| e.to_string())?;
            Ok(format!("vsock://-1:{}", settings.vsock_port))
        }
        [flag, value] if flag == "--listen" => match value.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(format!("unix://{path}")),
            _ => Err(format!("--listen {value:?}: expected unix:PATH")),
        },
        _ => Err(format!(
            "usage: moat-agent [--listen unix:PATH] (got {args:?})"
        )),
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::process::id() == 1 {
        // /proc is not there yet: read the settings once it is.
        mount_early_filesystems().map_err(|e| e.to_string())?;
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let settings = Settings::from_cmdline(&cmdline).map_err(|e| e.to_string())?;
        if let Some(name) = &settings.hostname {
            set_hostname(name).map_err(|e| e.to_string())?;
        }
        spawn_orphan_reaper().map_err(|e| format!("reaper thread: {e}"))?;
    }
    // As /init, argv holds whatever kernel parameters the kernel did not
    // recognise (e.g. `nomodule`): the settings come from /proc/cmdline.
    let address = if std::process::id() == 1 {
        address(&[])?
    } else {
        address(&args)?
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async {
        let mut server = ttrpc::r#async::Server::new()
            .bind(&address)
            .map_err(|e| format!("listen on {address}: {e}"))?
            .register_service(create_agent_service(Arc::new(Agent)));
        server
            .start()
            .await
            .map_err(|e| format!("serve on {address}: {e}"))?;
        println!("moat-agent: serving on {address}");
        // Serve until killed (on the host) or until the VM ends.
        std::future::pending::<()>().await;
        Ok(())
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat-agent: error: {e}");
            // As PID 1, returning would panic the kernel with no message
            // on the console; keep the error visible instead.
            if std::process::id() == 1 {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            ExitCode::FAILURE
        }
    }
}
