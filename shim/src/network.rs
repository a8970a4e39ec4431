//! Pod networking: what a CNI plugin made in the pod's network namespace,
//! carried into the VM.
//!
//! For every interface CNI made (a veth, usually) this module creates a tap
//! in the same namespace and joins the two with tc (Kata's "tcfilter"
//! model): an ingress qdisc on each, and a u32 filter on each that
//! redirects every frame (mirred egress redirect) to the other. moat-vmm,
//! started inside the namespace, serves the tap as a virtio-net device
//! whose MAC is the veth's, so the guest's interface answers for the
//! pod's addresses exactly as the veth would have. The addresses, MTU and
//! routes read here go to the guest agent before any container starts.
//!
//! Everything here runs in a thread that entered the namespace (netlink
//! sockets and taps belong to the namespace of the thread that opens
//! them); the shim's own threads never leave the host's namespace.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use moat_protocol::agent;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Suffix of the taps this module makes (`tap0_moat`, `tap1_moat`, ...):
/// detach removes exactly these.
const TAP_SUFFIX: &str = "_moat";
/// tc's protocol "all" (ETH_P_ALL), in network byte order as the kernel
/// reads `tcm_info`.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();
/// The parent of filters on an ingress qdisc (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;
/// The most interfaces a pod's VM takes (one virtio-net device, one IRQ
/// and one tap each): a namespace with more is refused, not truncated.
pub const MAX_INTERFACES: usize = 8;

/// Errors carrying a pod's network into its VM.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The namespace file could not be opened or entered.
    #[error("enter the pod's network namespace {path}: {source}")]
    Enter {
        /// The namespace's path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("in the pod's network namespace {netns}: {what}: {source}")]
    Netlink {
        /// The namespace's path.
        netns: PathBuf,
        /// What was asked.
        what: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// An interface has no Ethernet MAC, so a virtio-net device cannot
    /// stand in for it.
    #[error("interface {name} in the pod's network namespace {netns} has no Ethernet MAC (it is {kind}); a moat VM carries only Ethernet interfaces")]
    NotEthernet {
        /// The namespace's path.
        netns: PathBuf,
        /// The interface.
        name: String,
        /// What the interface has instead.
        kind: String,
    },
    /// The tap could not be made.
    #[error("create tap {name} in the pod's network namespace {netns}: {source}")]
    Tap {
        /// The namespace's path.
        netns: PathBuf,
        /// The tap's name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The namespace has more interfaces than a VM takes.
    #[error("the pod's network namespace {netns} has {count} interfaces; a moat VM takes at most {MAX_INTERFACES}")]
    TooMany {
        /// The namespace's path.
        netns: PathBuf,
        /// How many it has (loopback aside).
        count: usize,
    },
    /// The namespace's worker thread could not run.
    #[error("network namespace {netns}: {what}")]
    Worker {
        /// The namespace's path.
        netns: PathBuf,
        /// What went wrong.
        what: String,
    },
}

type Result<T> = std::result::Result<T, NetworkError>;

/// One interface CNI made, and the tap that carries it into the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The interface's name in the namespace (`eth0`).
    pub name: String,
    /// Its MAC, `aa:bb:cc:dd:ee:ff`: the guest interface takes it.
    pub mac: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its global addresses as CIDRs (`10.88.0.5/16`, `fd00::5/64`).
    pub addresses: Vec<String>,
    /// The tap joined to it (`tap0_moat`).
    pub tap: String,
    /// The guest's name for the device (`eth0`, in `--net` order).
    pub guest_device: String,
}

/// A pod's network as the VM gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodNetwork {
    /// The namespace CNI set up (moat-vmm runs in it).
    pub netns: PathBuf,
    /// The interfaces, in the order of the VM's devices.
    pub endpoints: Vec<Endpoint>,
    /// The namespace's routes over those interfaces (but the ones the
    /// guest kernel makes itself for each address's subnet).
    pub routes: Vec<agent::Route>,
}

impl PodNetwork {
    /// Finds the interfaces in `netns`, makes a tap for each and joins
    /// them. On an error nothing made here is left.
    /// `owner` (uid, gid) may open the taps without capabilities.
    pub fn attach(netns: &Path, owner: (u32, u32)) -> Result<Self> {
        let path = netns.to_path_buf();
        let attached = in_netns(netns, move |handle| attach_in(handle, path, owner));
        match attached {
            Ok(network) => Ok(network),
            Err(e) => {
                let _ = Self::detach(netns);
                Err(e)
            }
        }
    }

    /// Removes the taps (and with them their filters) and the ingress
    /// qdiscs on the other interfaces. Safe to run any number of times; a
    /// namespace that is gone has nothing left to remove.
    pub fn detach(netns: &Path) -> Result<()> {
        if !netns.exists() {
            return Ok(());
        }
        let path = netns.to_path_buf();
        in_netns(netns, move |handle| detach_in(handle, path))
    }

    /// moat-vmm's `--net` values, one per endpoint.
    pub fn vmm_net_args(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| format!("id={},tap={},mac={}", e.guest_device, e.tap, e.mac))
            .collect()
    }

    /// The agent's requests for each guest interface.
    pub fn interfaces(&self) -> Vec<agent::Interface> {
        self.endpoints
            .iter()
            .map(|e| agent::Interface {
                device: String::new(),
                mac: e.mac.clone(),
                addresses: e.addresses.clone(),
                mtu: e.mtu,
                ..Default::default()
            })
            .collect()
    }
}

/// Runs `work` with a netlink handle opened inside `netns`, on a thread
/// of its own (a thread's namespace is its own; this one ends after).
fn in_netns<T, F, Fut>(netns: &Path, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let path = netns.to_path_buf();
    let file = File::open(netns).map_err(|source| NetworkError::Enter {
        path: path.clone(),
        source,
    })?;
    let worker_path = path.clone();
    let worker = std::thread::Builder::new()
        .name("moat-netns".into())
        .spawn(move || -> Result<T> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetworkError::Enter {
                    path: worker_path.clone(),
                    source: e.into(),
                }
            })?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| NetworkError::Worker {
                    netns: worker_path.clone(),
                    what: format!("start a runtime: {e}"),
                })?;
            runtime.block_on(async move {
                let (connection, handle, _) =
                    rtnetlink::new_connection().map_err(|e| NetworkError::Worker {
                        netns: worker_path.clone(),
                        what: format!("open an rtnetlink socket: {e}"),
                    })?;
                let connection = tokio::spawn(connection);
                let result = work(handle).await;
                connection.abort();
                result
            })
        })
        .map_err(|e| NetworkError::Worker {
            netns: path.clone(),
            what: format!("start a thread: {e}"),
        })?;
    worker.join().map_err(|_| NetworkError::Worker {
        netns: path,
        what: "its thread panicked".into(),
    })?
}

fn netlink(netns: &Path, what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let (netns, what) = (netns.to_path_buf(), what.into());
    move |source| NetworkError::Netlink {
        netns,
        what,
        source,
    }
}

fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("#{}", link.header.index))
}

fn is_moat_tap(name: &str) -> bool {
    name.starts_with("tap") && name.ends_with(TAP_SUFFIX)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

async fn links(handle: &Handle, netns: &Path) -> Result<Vec<LinkMessage>> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, "list interfaces"))
}

async fn attach_in(handle: Handle, netns: PathBuf, owner: (u32, u32)) -> Result<PodNetwork> {
    let mut endpoints = Vec::new();
    let mut carried = Vec::new(); // (veth index, guest device)
    let candidates: Vec<LinkMessage> = links(&handle, &netns)
        .await?
        .into_iter()
        .filter(|l| !l.header.flags.contains(LinkFlags::Loopback) && !is_moat_tap(&link_name(l)))
        .collect();
    if candidates.len() > MAX_INTERFACES {
        return Err(NetworkError::TooMany {
            netns,
            count: candidates.len(),
        });
    }
    for link in candidates {
        let name = link_name(&link);
        let mac = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(mac.clone()),
            _ => None,
        });
        let mac = match mac {
            Some(mac) if mac.len() == 6 && mac.iter().any(|b| *b != 0) => mac,
            other => {
                return Err(NetworkError::NotEthernet {
                    netns,
                    name,
                    kind: match other {
                        Some(m) => format!("link address {} of {} bytes", format_mac(&m), m.len()),
                        None => "without a link address".into(),
                    },
                })
            }
        };
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
            .unwrap_or(1500);
        let index = link.header.index;
        let addresses = addresses_of(&handle, &netns, index, &name).await?;
        let n = endpoints.len();
        let tap = format!("tap{n}{TAP_SUFFIX}");
        let guest_device = format!("eth{n}");
        create_tap(&netns, &tap, owner)?;
        let tap_index = links(&handle, &netns)
            .await?
            .iter()
            .find(|l| link_name(l) == tap)
            .map(|l| l.header.index)
            .ok_or_else(|| NetworkError::Worker {
                netns: netns.clone(),
                what: format!("tap {tap} vanished after it was made"),
            })?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(tap_index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(netlink(
                &netns,
                format!("set MTU {mtu} on {tap} and bring it up"),
            ))?;
        join(&handle, &netns, (index, &name), (tap_index, &tap)).await?;
        carried.push((index, guest_device.clone()));
        endpoints.push(Endpoint {
            name,
            mac: format_mac(&mac),
            mtu,
            addresses,
            tap,
            guest_device,
        });
    }
    let routes = routes_of(&handle, &netns, &carried).await?;
    Ok(PodNetwork {
        netns,
        endpoints,
        routes,
    })
}

/// Joins two interfaces: whatever arrives on one leaves by the other.
async fn join(handle: &Handle, netns: &Path, a: (u32, &str), b: (u32, &str)) -> Result<()> {
    for (index, name) in [a, b] {
        handle
            .qdisc()
            .add(index as i32)
            .ingress()
            .execute()
            .await
            .map_err(netlink(netns, format!("add an ingress qdisc to {name}")))?;
    }
    for ((from, from_name), (to, to_name)) in [(a, b), (b, a)] {
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            .protocol(ETH_P_ALL_BE)
            .redirect(to)
            .map_err(netlink(
                netns,
                format!("build a redirect from {from_name} to {to_name}"),
            ))?
            .execute()
            .await
            .map_err(netlink(
                netns,
                format!("redirect {from_name}'s ingress to {to_name}"),
            ))?;
    }
    Ok(())
}

async fn addresses_of(
    handle: &Handle,
    netns: &Path,
    index: u32,
    name: &str,
) -> Result<Vec<String>> {
    let messages: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, format!("list the addresses of {name}")))?;
    let mut addresses = Vec::new();
    for message in messages {
        // Link-local addresses belong to the link; the guest makes its own.
        if message.header.index != index || message.header.scope != AddressScope::Universe {
            continue;
        }
        let address = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = address {
            addresses.push(format!("{ip}/{}", message.header.prefix_len));
        }
    }
    Ok(addresses)
}

async fn routes_of(
    handle: &Handle,
    netns: &Path,
    carried: &[(u32, String)],
) -> Result<Vec<agent::Route>> {
    let mut messages: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, "list IPv4 routes"))?;
    let v6: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, "list IPv6 routes"))?;
    messages.extend(v6);
    let mut routes = Vec::new();
    for message in messages {
        if let Some(route) = guest_route(&message, carried) {
            if !routes.contains(&route) {
                routes.push(route);
            }
        }
    }
    // Routes through a gateway need the gateway's subnet first: the
    // agent adds them in order.
    routes.sort_by_key(|r| !r.gateway.is_empty());
    Ok(routes)
}

/// The guest's copy of one of the namespace's routes, if it needs one:
/// unicast routes of the main table over a carried interface, but not the
/// subnet routes the kernel made for an address (the guest's kernel makes
/// the same when the agent adds the address).
fn guest_route(message: &RouteMessage, carried: &[(u32, String)]) -> Option<agent::Route> {
    let header = &message.header;
    let table = message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || header.kind != RouteType::Unicast
        || header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut destination = None;
    let mut gateway = None;
    let mut oif = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(a) => destination = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let device = carried.iter().find(|(i, _)| Some(*i) == oif)?.1.clone();
    if let Some(IpAddr::V6(d)) = destination {
        // fe80::/64 and multicast: the guest's kernel has its own.
        if d.segments()[0] & 0xffc0 == 0xfe80 || d.is_multicast() {
            return None;
        }
    }
    let destination = match destination {
        Some(ip) if header.destination_prefix_length > 0 => {
            format!("{ip}/{}", header.destination_prefix_length)
        }
        _ => "default".to_string(),
    };
    Some(agent::Route {
        destination,
        gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
        device,
        ..Default::default()
    })
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

async fn detach_in(handle: Handle, netns: PathBuf) -> Result<()> {
    for link in links(&handle, &netns).await? {
        let name = link_name(&link);
        let index = link.header.index;
        if is_moat_tap(&name) {
            // A tap's qdisc and filters go with it.
            handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(netlink(&netns, format!("delete {name}")))?;
        } else if !link.header.flags.contains(LinkFlags::Loopback) {
            let mut request = handle.qdisc().del(index as i32);
            let message = request.message_mut();
            message.header.parent = TcHandle::INGRESS;
            message.header.handle = TcHandle::from(INGRESS_PARENT);
            // Absent already (never attached, or removed before): fine.
            let _ = request.execute().await;
        }
    }
    Ok(())
}

/// Creates a persistent tap `name` that `owner` (uid, gid) may open
/// without capabilities (moat-vmm opens it by name later, jailed).
fn create_tap(netns: &Path, name: &str, owner: (u32, u32)) -> Result<()> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
    const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _rest: [u8; 22],
    }
    let error = |source: std::io::Error| NetworkError::Tap {
        netns: netns.to_path_buf(),
        name: name.to_string(),
        source,
    };
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(error)?;
    let mut request = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _rest: [0; 22],
    };
    // Names here are ours: "tap<N>_moat", well under IFNAMSIZ.
    let bytes = name.as_bytes();
    let len = bytes.len().min(15);
    request.name[..len].copy_from_slice(&bytes[..len]);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
    // `IfReq` matches in size (40 bytes) and layout; the fd is open.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut request) } < 0 {
        return Err(error(std::io::Error::last_os_error()));
    }
    for (request, id) in [(TUNSETOWNER, owner.0), (TUNSETGROUP, owner.1)] {
        // SAFETY: TUNSETOWNER and TUNSETGROUP take an integer, no memory.
        if unsafe { libc::ioctl(tun.as_raw_fd(), request, id as libc::c_ulong) } < 0 {
            return Err(error(std::io::Error::last_os_error()));
        }
    }
    // SAFETY: TUNSETPERSIST takes an integer argument, no memory.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(error(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::RouteHeader;

    fn route(
        dest: Option<(IpAddr, u8)>,
        gateway: Option<IpAddr>,
        oif: u32,
        protocol: RouteProtocol,
    ) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header = RouteHeader {
            table: RouteHeader::RT_TABLE_MAIN,
            kind: RouteType::Unicast,
            protocol,
            destination_prefix_length: dest.map(|d| d.1).unwrap_or(0),
            ..Default::default()
        };
        if let Some((ip, _)) = dest {
            message
                .attributes
                .push(RouteAttribute::Destination(ip.into()));
        }
        if let Some(g) = gateway {
            message.attributes.push(RouteAttribute::Gateway(g.into()));
        }
        message.attributes.push(RouteAttribute::Oif(oif));
        message
    }

    #[test]
    fn routes_the_guest_needs_are_kept_and_kernel_ones_dropped() {
        let carried = [(7, "eth0".to_string())];
        let default = route(
            None,
            Some("10.88.0.1".parse().unwrap()),
            7,
            RouteProtocol::Boot,
        );
        assert_eq!(
            guest_route(&default, &carried),
            Some(agent::Route {
                destination: "default".into(),
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            })
        );
        let subnet = route(
            Some(("10.88.0.0".parse().unwrap(), 16)),
            None,
            7,
            RouteProtocol::Kernel,
        );
        assert_eq!(guest_route(&subnet, &carried), None);
        let elsewhere = route(
            None,
            Some("10.0.0.1".parse().unwrap()),
            9,
            RouteProtocol::Boot,
        );
        assert_eq!(
            guest_route(&elsewhere, &carried),
            None,
            "not over a carried interface"
        );
        let static_v6 = route(
            Some(("fd00:1::".parse().unwrap(), 64)),
            Some("fd00::1".parse().unwrap()),
            7,
            RouteProtocol::Static,
        );
        assert_eq!(
            guest_route(&static_v6, &carried).map(|r| r.destination),
            Some("fd00:1::/64".to_string())
        );
        let link_local = route(
            Some(("fe80::".parse().unwrap(), 64)),
            None,
            7,
            RouteProtocol::Static,
        );
        assert_eq!(guest_route(&link_local, &carried), None);
    }

    #[test]
    fn only_our_taps_are_ours() {
        assert!(is_moat_tap("tap0_moat"));
        assert!(!is_moat_tap("tap0_kata"));
        assert!(!is_moat_tap("eth0"));
        assert_eq!(format_mac(&[2, 0, 0, 0, 0, 0x0a]), "02:00:00:00:00:0a");
    }
}
