//! TCP sockets as the kernel lists them in `/proc/net/tcp` and `/proc/net/tcp6`: who listens on
//! which port (its owner's uid and socket inode). Port previews use it twice: the ports API parses
//! the text read over SSH inside an environment, and the local provider's SSH server checks, before
//! it forwards a `direct-tcpip` channel, that the port belongs to the environment's own account and
//! not to this server (the API), PostgreSQL or another tenant, who all share the host's loopback.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `st` of a listening socket in `/proc/net/tcp`.
const STATE_LISTEN: u8 = 0x0A;
/// Most socket lines parsed from one text (a busy host has a few thousand; the rest is ignored).
pub const MAX_SOCKETS: usize = 65_536;
/// Descriptors of this process inspected for sockets (well above `server.max_connections`).
const MAX_OWN_FDS: usize = 1 << 20;

/// One line of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Socket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel TCP state (`0x0A` = LISTEN, `0x01` = ESTABLISHED).
    pub state: u8,
    pub uid: u32,
    pub inode: u64,
}

impl Socket {
    pub fn listening(&self) -> bool {
        self.state == STATE_LISTEN
    }
}

/// Parse the text of `/proc/net/tcp` and/or `/proc/net/tcp6` (any mix, headers and unrelated
/// lines skipped), at most [`MAX_SOCKETS`] sockets.
pub fn parse(text: &str) -> Vec<Socket> {
    text.lines()
        .filter_map(parse_line)
        .take(MAX_SOCKETS)
        .collect()
}

fn parse_line(line: &str) -> Option<Socket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 || !fields[0].ends_with(':') {
        return None;
    }
    Some(Socket {
        local: parse_addr(fields[1])?,
        remote: parse_addr(fields[2])?,
        state: u8::from_str_radix(fields[3], 16).ok()?,
        uid: fields[7].parse().ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6): each 32-bit word in host byte order.
fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let ip = match (ip.len(), words.as_slice()) {
        (8, [w]) => IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes())),
        (32, [a, b, c, d]) => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].into_iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The listening ports in `sockets` owned by `uid` (every uid when `None`), without those whose
/// inode is in `exclude`; sorted, each once.
pub fn listening_ports(sockets: &[Socket], uid: Option<u32>, exclude: &HashSet<u64>) -> Vec<u16> {
    let mut ports: Vec<u16> = sockets
        .iter()
        .filter(|s| s.listening() && uid.is_none_or(|u| s.uid == u) && !exclude.contains(&s.inode))
        .map(|s| s.local.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// This host's TCP sockets (IPv4 and IPv6), read now.
pub fn host_sockets() -> std::io::Result<Vec<Socket>> {
    let mut text = std::fs::read_to_string("/proc/net/tcp")?;
    // A host without IPv6 has no tcp6 table.
    if let Ok(v6) = std::fs::read_to_string("/proc/net/tcp6") {
        text.push_str(&v6);
    }
    Ok(parse(&text))
}

/// The inodes of every socket this process holds (its API listener, its SSH server, its
/// database connections...): a port behind one of them is never an environment's.
pub fn own_socket_inodes() -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    dir.flatten()
        .take(MAX_OWN_FDS)
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter_map(|target| {
            let text = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?;
            text.parse().ok()
        })
        .collect()
}

/// Why a port is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("nothing listens on port {0}")]
    NotListening(u16),
    #[error("port {0} is not this environment's")]
    NotOwned(u16),
}

/// Where to connect to reach `port` on this host's loopback, if every socket listening on it is
/// owned by `uid` and none is held by this process: the listener's own address, with a wildcard
/// (`0.0.0.0`, `::`) replaced by the loopback address of its family.
pub fn forward_target(
    sockets: &[Socket],
    port: u16,
    uid: u32,
    own: &HashSet<u64>,
) -> Result<SocketAddr, Refusal> {
    let on_port: Vec<&Socket> = sockets
        .iter()
        .filter(|s| s.listening() && s.local.port() == port)
        .collect();
    let Some(first) = on_port.first() else {
        return Err(Refusal::NotListening(port));
    };
    if on_port
        .iter()
        .any(|s| s.uid != uid || own.contains(&s.inode))
    {
        return Err(Refusal::NotOwned(port));
    }
    // Prefer a loopback or wildcard listener (what a dev server binds).
    let chosen = on_port
        .iter()
        .find(|s| s.local.ip().is_loopback())
        .unwrap_or(first);
    let ip = match chosen.local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, port))
}

/// After connecting from `ours` to `target`: whether the socket that accepted us (the kernel
/// copies the listener's owner to it) is owned by `uid`. Closes the window between the check in
/// [`forward_target`] and the connect, in which the port could have changed hands.
pub fn accepted_by(sockets: &[Socket], target: SocketAddr, ours: SocketAddr, uid: u32) -> bool {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    sockets.iter().any(|s| {
        !s.listening()
            && canonical(s.local) == canonical(target)
            && canonical(s.remote) == canonical(ours)
            && s.uid == uid
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 777 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1001        0 0 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 5151 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 9 1 0000000000000000 100 0 0 10 0
";

    fn sockets() -> Vec<Socket> {
        parse(&format!("{TCP}{TCP6}"))
    }

    #[test]
    fn both_tables_parse() {
        let s = sockets();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].local, "127.0.0.1:8080".parse().expect("addr"));
        assert!(s[0].listening());
        assert_eq!((s[0].uid, s[0].inode), (1001, 4242));
        assert_eq!(s[1].local, "0.0.0.0:5432".parse().expect("addr"));
        assert_eq!(s[2].remote, "127.0.0.1:54321".parse().expect("addr"));
        assert!(!s[2].listening());
        assert_eq!(s[3].local, "[::]:8000".parse().expect("addr"));
        assert_eq!(s[4].local, "[::1]:80".parse().expect("addr"));
        assert!(parse("garbage\n 0: zz:1 00:0 0A").is_empty());
    }

    #[test]
    fn ports_of_one_account_without_our_own() {
        let s = sockets();
        let none = HashSet::new();
        assert_eq!(listening_ports(&s, Some(1001), &none), vec![8000, 8080]);
        assert_eq!(listening_ports(&s, None, &none), vec![80, 5432, 8000, 8080]);
        let own: HashSet<u64> = [4242].into();
        assert_eq!(listening_ports(&s, Some(1001), &own), vec![8000]);
    }

    #[test]
    fn forwarding_only_to_the_accounts_own_ports() {
        let s = sockets();
        let none = HashSet::new();
        assert_eq!(
            forward_target(&s, 8080, 1001, &none),
            Ok("127.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(
            forward_target(&s, 8000, 1001, &none),
            Ok("[::1]:8000".parse().expect("addr"))
        );
        assert_eq!(
            forward_target(&s, 5432, 1001, &none),
            Err(Refusal::NotOwned(5432))
        );
        assert_eq!(
            forward_target(&s, 8080, 1001, &[4242].into()),
            Err(Refusal::NotOwned(8080))
        );
        assert_eq!(
            forward_target(&s, 9999, 1001, &none),
            Err(Refusal::NotListening(9999))
        );
    }

    #[test]
    fn the_accepting_socket_must_be_the_accounts() {
        let s = sockets();
        let target = "127.0.0.1:8080".parse().expect("addr");
        let ours = "127.0.0.1:54321".parse().expect("addr");
        assert!(accepted_by(&s, target, ours, 1001));
        assert!(!accepted_by(&s, target, ours, 1002));
        assert!(!accepted_by(
            &s,
            target,
            "127.0.0.1:1".parse().expect("addr"),
            1001
        ));
    }
}
