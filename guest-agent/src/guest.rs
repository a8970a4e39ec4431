//! The pod's guest-wide settings the shim asks for: the clock, network
//! interfaces and routes (over rtnetlink), and DNS.
//!
//! DNS goes to `STATE/resolv.conf` (`/run/moat/resolv.conf` in the
//! guest), which container specs bind-mount as `/etc/resolv.conf`, as
//! CRI does with the sandbox's file.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use futures_util::TryStreamExt;
use moat_protocol::agent::{Interface, Route, SetDnsRequest};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Errors applying a guest setting; each names the input.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A field is malformed.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The field and its value.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// No interface matches.
    #[error("{0}")]
    NotFound(String),
    /// The kernel refused.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, GuestError>;

fn invalid(what: impl Into<String>, why: impl std::fmt::Display) -> GuestError {
    GuestError::Invalid {
        what: what.into(),
        why: why.to_string(),
    }
}

fn netlink_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> GuestError {
    let what = what.into();
    move |e| GuestError::Io {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

/// Where the guest settings go.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// The agent's state directory.
    pub state_dir: PathBuf,
}

/// Sets the guest's wall clock.
pub fn set_time(seconds: i64, nanos: i64) -> Result<()> {
    if !(0..1_000_000_000).contains(&nanos) {
        return Err(invalid(
            format!("nanos {nanos}"),
            "must be in 0..1000000000",
        ));
    }
    if seconds < 0 {
        return Err(invalid(format!("seconds {seconds}"), "is before 1970"));
    }
    let ts = libc::timespec {
        tv_sec: seconds,
        tv_nsec: nanos,
    };
    // SAFETY: clock_settime reads a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(GuestError::Io {
            what: format!("set the clock to {seconds}.{nanos:09}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Writes `STATE/resolv.conf`.
pub fn set_dns(config: &GuestConfig, req: &SetDnsRequest) -> Result<()> {
    let mut text = String::new();
    for server in &req.nameservers {
        let ip: IpAddr = server
            .parse()
            .map_err(|e| invalid(format!("nameserver {server:?}"), e))?;
        text.push_str(&format!("nameserver {ip}\n"));
    }
    let clean = |what: &str, s: &String| {
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Err(invalid(
                format!("{what} {s:?}"),
                "must be one non-empty word",
            ))
        } else {
            Ok(s.clone())
        }
    };
    let searches = req
        .searches
        .iter()
        .map(|s| clean("search domain", s))
        .collect::<Result<Vec<_>>>()?;
    let options = req
        .options
        .iter()
        .map(|s| clean("resolver option", s))
        .collect::<Result<Vec<_>>>()?;
    if !searches.is_empty() {
        text.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        text.push_str(&format!("options {}\n", options.join(" ")));
    }
    let path = config.state_dir.join("resolv.conf");
    let tmp = config.state_dir.join("resolv.conf.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| GuestError::Io {
            what: format!("write {}", path.display()),
            source,
        })
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Result<Vec<u8>> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| invalid(format!("MAC {mac:?}"), e))?;
    if bytes.len() != 6 || mac.split(':').any(|b| b.len() != 2) {
        return Err(invalid(format!("MAC {mac:?}"), "expected six hex bytes"));
    }
    Ok(bytes)
}

/// Parses `ADDR/PREFIX`.
pub fn parse_cidr(what: &str, cidr: &str) -> Result<(IpAddr, u8)> {
    let (addr, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| invalid(format!("{what} {cidr:?}"), "expected ADDRESS/PREFIX"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|e| invalid(format!("{what} {cidr:?}"), e))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|e| invalid(format!("{what} {cidr:?}"), e))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(invalid(
            format!("{what} {cidr:?}"),
            format!("prefix longer than {max}"),
        ));
    }
    Ok((addr, prefix))
}

async fn connect() -> Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| GuestError::Io {
        what: "open an rtnetlink socket".to_string(),
        source,
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

fn link_mac(link: &LinkMessage) -> Option<Vec<u8>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.clone()),
        _ => None,
    })
}

async fn find_link(handle: &Handle, device: &str, mac: Option<&[u8]>) -> Result<LinkMessage> {
    let mut links = handle.link().get().execute();
    while let Some(link) = links
        .try_next()
        .await
        .map_err(netlink_err("list network interfaces"))?
    {
        let matches = if device.is_empty() {
            mac.is_some_and(|m| link_mac(&link).as_deref() == Some(m))
        } else {
            link_name(&link).as_deref() == Some(device)
        };
        if matches {
            return Ok(link);
        }
    }
    Err(GuestError::NotFound(if device.is_empty() {
        format!("no network interface has MAC {mac:02x?}")
    } else {
        format!("no network interface is named {device:?}")
    }))
}

/// Configures an interface (found by name, or by MAC when the name is
/// empty): MTU, addresses (added to any it has) and up. Returns it as
/// configured, with its name.
pub async fn update_interface(interface: &Interface) -> Result<Interface> {
    let mac = if interface.mac.is_empty() {
        None
    } else {
        Some(parse_mac(&interface.mac)?)
    };
    if interface.device.is_empty() && mac.is_none() {
        return Err(invalid("interface", "neither device nor MAC given"));
    }
    let addresses = interface
        .addresses
        .iter()
        .map(|a| parse_cidr("address", a))
        .collect::<Result<Vec<_>>>()?;
    let handle = connect().await?;
    let link = find_link(&handle, &interface.device, mac.as_deref()).await?;
    let index = link.header.index;
    let name = link_name(&link).unwrap_or_default();
    if interface.mtu > 0 {
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(interface.mtu).build())
            .execute()
            .await
            .map_err(netlink_err(format!("set MTU {} on {name}", interface.mtu)))?;
    }
    for (addr, prefix) in &addresses {
        handle
            .address()
            .add(index, *addr, *prefix)
            .replace()
            .execute()
            .await
            .map_err(netlink_err(format!("add {addr}/{prefix} to {name}")))?;
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink_err(format!("bring {name} up")))?;
    let mut out = interface.clone();
    out.device = name;
    if out.mac.is_empty() {
        if let Some(mac) = link_mac(&link) {
            out.mac = mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
        }
    }
    Ok(out)
}

/// Adds (or replaces) routes. `destination` is `ADDR/PREFIX` or
/// `default`; the gateway and device are optional, but one is needed.
pub async fn update_routes(routes: &[Route]) -> Result<()> {
    let handle = connect().await?;
    for route in routes {
        let what = format!(
            "route {} via {:?} dev {:?}",
            route.destination, route.gateway, route.device
        );
        let gateway: Option<IpAddr> = if route.gateway.is_empty() {
            None
        } else {
            Some(
                route
                    .gateway
                    .parse()
                    .map_err(|e| invalid(format!("gateway {:?}", route.gateway), e))?,
            )
        };
        let (dest, prefix) = if route.destination == "default" {
            match gateway {
                Some(IpAddr::V6(_)) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
                _ => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            }
        } else {
            parse_cidr("route destination", &route.destination)?
        };
        let index = if route.device.is_empty() {
            None
        } else {
            Some(find_link(&handle, &route.device, None).await?.header.index)
        };
        if gateway.is_none() && index.is_none() {
            return Err(invalid(what, "needs a gateway or a device"));
        }
        let scope = if gateway.is_none() {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        let message = match (dest, gateway) {
            (IpAddr::V4(d), gw) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d, prefix)
                    .scope(scope);
                match gw {
                    Some(IpAddr::V4(g)) => b = b.gateway(g),
                    Some(IpAddr::V6(_)) => {
                        return Err(invalid(what, "IPv4 destination with an IPv6 gateway"))
                    }
                    None => {}
                }
                if let Some(i) = index {
                    b = b.output_interface(i);
                }
                b.build()
            }
            (IpAddr::V6(d), gw) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(d, prefix)
                    .scope(scope);
                match gw {
                    Some(IpAddr::V6(g)) => b = b.gateway(g),
                    Some(IpAddr::V4(_)) => {
                        return Err(invalid(what, "IPv6 destination with an IPv4 gateway"))
                    }
                    None => {}
                }
                if let Some(i) = index {
                    b = b.output_interface(i);
                }
                b.build()
            }
        };
        handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(netlink_err(what))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_cidrs_are_checked() {
        assert_eq!(parse_mac("02:00:00:00:00:0a").unwrap(), [2, 0, 0, 0, 0, 10]);
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:0g").is_err());
        assert!(parse_mac("2:0:0:0:0:a").is_err());
        assert_eq!(
            parse_cidr("a", "10.0.0.2/24").unwrap(),
            ("10.0.0.2".parse().unwrap(), 24)
        );
        assert!(parse_cidr("a", "10.0.0.2/33").is_err());
        assert!(parse_cidr("a", "10.0.0.2").is_err());
        assert!(parse_cidr("a", "fd00::1/64").is_ok());
    }

    #[test]
    fn time_out_of_range_is_refused() {
        assert!(matches!(
            set_time(0, 1_000_000_000),
            Err(GuestError::Invalid { .. })
        ));
        assert!(matches!(set_time(-1, 0), Err(GuestError::Invalid { .. })));
    }

    #[test]
    fn dns_is_written_and_checked() {
        let dir = std::env::temp_dir().join(format!("moat-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = GuestConfig {
            state_dir: dir.clone(),
        };
        let req = SetDnsRequest {
            nameservers: vec!["10.0.0.1".into(), "fd00::1".into()],
            searches: vec!["svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
            ..Default::default()
        };
        set_dns(&config, &req).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("resolv.conf")).unwrap(),
            "nameserver 10.0.0.1\nnameserver fd00::1\nsearch svc.cluster.local\noptions ndots:5\n"
        );
        let bad = SetDnsRequest {
            nameservers: vec!["not-an-ip".into()],
            ..Default::default()
        };
        assert!(set_dns(&config, &bad)
            .unwrap_err()
            .to_string()
            .contains("not-an-ip"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
