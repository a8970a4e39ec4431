//! The agent's settings: from the kernel command line inside a VM
//! (`moat.agent_port=`, `moat.hostname=`, `moat.share=`), or from flags on
//! the host.

/// What the agent serves and how it sets the guest up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The vsock port to serve on.
    pub vsock_port: u32,
    /// The guest's hostname, if the command line sets one.
    pub hostname: Option<String>,
    /// The virtio-fs tag of the pod's share, mounted at boot, if any.
    pub share_tag: Option<String>,
}

/// Errors in the command line's agent settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// `moat.agent_port` is not a port number.
    #[error("moat.agent_port={0:?} is not a vsock port number")]
    Port(String),
    /// `moat.share` is not a virtio-fs tag (1 to 36 bytes).
    #[error("moat.share={0:?} is not a virtio-fs tag (1 to 36 bytes)")]
    ShareTag(String),
}

impl Settings {
    /// Reads the `moat.` parameters of a kernel command line; others are
    /// ignored.
    pub fn from_cmdline(cmdline: &str) -> Result<Self, SettingsError> {
        let mut settings = Settings {
            vsock_port: moat_protocol::DEFAULT_AGENT_PORT,
            hostname: None,
            share_tag: None,
        };
        for word in cmdline.split_whitespace() {
            if let Some(port) = word.strip_prefix("moat.agent_port=") {
                settings.vsock_port = port
                    .parse()
                    .map_err(|_| SettingsError::Port(port.to_string()))?;
            } else if let Some(name) = word.strip_prefix("moat.hostname=") {
                settings.hostname = Some(name.to_string());
            } else if let Some(tag) = word.strip_prefix("moat.share=") {
                if tag.is_empty() || tag.len() > 36 {
                    return Err(SettingsError::ShareTag(tag.to_string()));
                }
                settings.share_tag = Some(tag.to_string());
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

    #[test]
    fn share_tag() {
        assert_eq!(Settings::from_cmdline("quiet").unwrap().share_tag, None);
        let s = Settings::from_cmdline("moat.share=moat-pod quiet").unwrap();
        assert_eq!(s.share_tag.as_deref(), Some("moat-pod"));
        for bad in ["moat.share=", &format!("moat.share={}", "t".repeat(37))] {
            let err = Settings::from_cmdline(bad).unwrap_err().to_string();
            assert!(err.contains("not a virtio-fs tag"), "{err}");
        }
    }
}
