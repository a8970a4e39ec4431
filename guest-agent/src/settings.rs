//! The agent's settings: from the kernel command line inside a VM
//! (`moat.agent_port=`, `moat.hostname=`), or from flags on the host.

/// What the agent serves and how it sets the guest up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The vsock port to serve on.
    pub vsock_port: u32,
    /// The guest's hostname, if the command line sets one.
    pub hostname: Option<String>,
}

/// Errors in the command line's agent settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// `moat.agent_port` is not a port number.
    #[error("moat.agent_port={0:?} is not a vsock port number")]
    Port(String),
}

impl Settings {
    /// Reads the `moat.` parameters of a kernel command line; others are
    /// ignored.
    pub fn from_cmdline(cmdline: &str) -> Result<Self, SettingsError> {
        let mut settings = Settings {
            vsock_port: moat_protocol::DEFAULT_AGENT_PORT,
            hostname: None,
        };
        for word in cmdline.split_whitespace() {
            if let Some(port) = word.strip_prefix("moat.agent_port=") {
                settings.vsock_port = port
                    .parse()
                    .map_err(|_| SettingsError::Port(port.to_string()))?;
            } else if let Some(name) = word.strip_prefix("moat.hostname=") {
                settings.hostname = Some(name.to_string());
            }
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let s = Settings::from_cmdline("console=ttyS0 quiet").unwrap();
        assert_eq!(s.vsock_port, 1024);
        assert_eq!(s.hostname, None);
        let s = Settings::from_cmdline("moat.agent_port=2000 moat.hostname=pod-a").unwrap();
        assert_eq!(s.vsock_port, 2000);
        assert_eq!(s.hostname.as_deref(), Some("pod-a"));
        let err = Settings::from_cmdline("moat.agent_port=http").unwrap_err();
        assert_eq!(
            err.to_string(),
            "moat.agent_port=\"http\" is not a vsock port number"
        );
    }
}
