//! moat-agent: `/init` of the pod VM's initramfs, or, with `--listen
//! unix:PATH`, the same service on the host for tests. Run as
//! `moat-agent create-container|exec-process …` it is the one-shot helper
//! of [`moat_agent::helper`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use moat_agent::engine::{Engine, EngineConfig};
use moat_agent::guest::GuestConfig;
use moat_agent::init::{
    enable_cgroup_controllers, mount_early_filesystems, mount_share, set_hostname,
    switch_to_tmpfs_root,
};
use moat_agent::oom::OomWatcher;
use moat_agent::reaper::Reaper;
use moat_agent::service::Agent;
use moat_agent::settings::Settings;
use moat_protocol::agent::Interface;
use moat_protocol::agent_ttrpc::create_agent_service;

/// Where and how the agent serves.
struct Options {
    address: String,
    state_dir: PathBuf,
    cgroup_parent: String,
}

/// Where the agent keeps its state and puts container cgroups, unless
/// told otherwise on the host.
const DEFAULT_STATE_DIR: &str = "/run/moat";
const DEFAULT_CGROUP_PARENT: &str = "/moat";

const USAGE: &str =
    "usage: moat-agent --listen unix:PATH [--state-dir DIR] [--cgroup-parent /CGROUP]";

fn host_options(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        address: String::new(),
        state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        cgroup_parent: DEFAULT_CGROUP_PARENT.to_string(),
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--listen" => match value.strip_prefix("unix:") {
                Some(path) if !path.is_empty() => options.address = format!("unix://{path}"),
                _ => return Err(format!("--listen {value:?}: expected unix:PATH")),
            },
            "--state-dir" => options.state_dir = PathBuf::from(value),
            "--cgroup-parent" if value.starts_with('/') => options.cgroup_parent = value.clone(),
            "--cgroup-parent" => {
                return Err(format!("--cgroup-parent {value:?}: must be absolute"))
            }
            other => return Err(format!("unknown flag {other:?}; {USAGE}")),
        }
    }
    if options.address.is_empty() {
        return Err(USAGE.to_string());
    }
    Ok(options)
}

/// PID 1's duties before serving; returns where to serve.
fn init_guest() -> Result<Options, String> {
    switch_to_tmpfs_root().map_err(|e| e.to_string())?;
    mount_early_filesystems().map_err(|e| e.to_string())?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let settings = Settings::from_cmdline(&cmdline).map_err(|e| e.to_string())?;
    if let Some(name) = &settings.hostname {
        set_hostname(name).map_err(|e| e.to_string())?;
    }
    enable_cgroup_controllers().map_err(|e| e.to_string())?;
    if let Some(tag) = &settings.share_tag {
        mount_share(tag).map_err(|e| e.to_string())?;
    }
    Ok(Options {
        address: format!("vsock://-1:{}", settings.vsock_port),
        state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        cgroup_parent: DEFAULT_CGROUP_PARENT.to_string(),
    })
}

fn run(args: &[String]) -> Result<(), String> {
    let pid1 = std::process::id() == 1;
    // As /init, argv holds whatever kernel parameters the kernel did not
    // recognise (e.g. `nomodule`): the settings come from /proc/cmdline.
    let options = if pid1 {
        init_guest()?
    } else {
        let options = host_options(args)?;
        // Orphaned container processes must come back to the agent, as
        // they do to PID 1 in the guest.
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(format!(
                "PR_SET_CHILD_SUBREAPER: {}",
                std::io::Error::last_os_error()
            ));
        }
        options
    };
    // Before any thread starts: it records the original in the
    // environment the helpers inherit.
    moat_agent::limits::raise_nofile()?;
    let reaper = Reaper::start().map_err(|e| format!("reaper thread: {e}"))?;
    let oom = OomWatcher::start().map_err(|e| format!("OOM watcher: {e}"))?;
    let agent_exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let engine = Engine::new(
        EngineConfig {
            state_dir: options.state_dir.clone(),
            cgroup_parent: options.cgroup_parent.clone(),
            agent_exe,
        },
        reaper,
        oom,
    )
    .map_err(|e| format!("state directory {}: {e}", options.state_dir.display()))?;
    let agent = Arc::new(Agent::new(
        Arc::new(engine),
        GuestConfig {
            state_dir: options.state_dir.clone(),
        },
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let address = options.address;
    runtime.block_on(async {
        if pid1 {
            let lo = Interface {
                device: "lo".into(),
                ..Default::default()
            };
            if let Err(e) = moat_agent::guest::update_interface(&lo).await {
                eprintln!("moat-agent: bring lo up: {e}");
            }
        }
        let mut server = ttrpc::r#async::Server::new()
            .bind(&address)
            .map_err(|e| format!("listen on {address}: {e}"))?
            .register_service(create_agent_service(agent));
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = moat_agent::helper::run_if_helper(&args) {
        return ExitCode::from(code as u8);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat-agent: error: {e}");
            // As PID 1, returning would panic the kernel. The error is on
            // the console now; end the VM, so the shim sees its VMM exit
            // with these last words at once instead of waiting out its
            // boot timeout on a guest that will never serve.
            if std::process::id() == 1 {
                // SAFETY: sync and reboot take no pointers; reboot only
                // returns on failure, and then the loop keeps PID 1 alive.
                unsafe {
                    libc::sync();
                    libc::reboot(libc::RB_AUTOBOOT);
                }
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            ExitCode::FAILURE
        }
    }
}
