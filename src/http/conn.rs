//! Connection admission and deadlines: what keeps one client from taking the front end down.
//!
//! - A per-client-address cap on concurrent connections ([`PerIpConnections`]); connections from
//!   `server.trusted_proxies` are exempt.
//! - The client address of a request ([`client_ip`]): the peer, or behind a trusted proxy the
//!   rightmost untrusted `X-Forwarded-For` entry. Rate limits and the audit log use it.
//! - Deadlines for the request head ([`HeadDeadline`]): counted from accept (so they run before
//!   hyper-util's protocol detection reads anything) and again from the end of each response for
//!   the next head on a keep-alive connection. Body deadlines are in `read_body`.
//! - [`Held`]: the accepted stream together with the admission it holds, so a connection upgraded
//!   to a WebSocket keeps counting against both caps until it closes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderMap;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::Instant;

/// Longest `X-Forwarded-For` chain walked (entries, from the right); a longer chain is a client
/// padding it, and the walk stops at the bound.
const MAX_FORWARDED_HOPS: usize = 32;

/// The networks named by `server.trusted_proxies`.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// The client address of a request from `peer`. A peer that is not a trusted proxy is the client
/// (whatever `X-Forwarded-For` it sends). Behind a trusted proxy, `X-Forwarded-For` is walked from
/// the right (each proxy appends the address it saw) past further trusted proxies; the first
/// untrusted entry is the client. An entry that is not an address ends the walk at the hop that
/// appended it; a chain of trusted proxies only yields its leftmost entry.
pub fn client_ip(trusted: &TrustedProxies, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let mut client = peer.to_canonical();
    if !trusted.contains(client) {
        return client;
    }
    let mut entries = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|v| {
            v.to_str()
                .unwrap_or("")
                .rsplit(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
        })
        .take(MAX_FORWARDED_HOPS);
    for entry in entries.by_ref() {
        let Some(ip) = parse_forwarded_entry(entry) else {
            break;
        };
        client = ip;
        if !trusted.contains(ip) {
            break;
        }
    }
    client
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse().ok())
        })
        .map(|ip: IpAddr| ip.to_canonical())
}

/// What one client address counts as for the per-address cap: an IPv4 address, or the /64 of an
/// IPv6 address (one subscriber's usual allocation, which it can otherwise rotate through).
fn cap_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Live connections per client address, capped at `server.max_connections_per_ip`. Entries are
/// removed when their count drops to zero, so the map follows the connected clients only.
pub struct PerIpConnections {
    cap: u32,
    live: Mutex<HashMap<IpAddr, u32>>,
}

impl PerIpConnections {
    pub fn new(cap: u32) -> Arc<Self> {
        Arc::new(Self {
            cap,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it already holds `cap`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let key = cap_key(ip);
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let count = live.entry(key).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            owner: self.clone(),
            key,
        })
    }

    /// Connections now held by `ip` (for tests and diagnostics).
    pub fn held_by(&self, ip: IpAddr) -> u32 {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(&cap_key(ip)).copied().unwrap_or(0)
    }
}

/// One connection's place under the per-address cap; released on drop.
pub struct IpSlot {
    owner: Arc<PerIpConnections>,
    key: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut live = self.owner.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = live.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                live.remove(&self.key);
            }
        }
    }
}

/// An accepted stream with the admission it holds (a global permit and, unless it comes from a
/// trusted proxy, a per-address slot). Both are released when the stream is dropped, which for
/// an upgraded connection is when the WebSocket ends.
pub struct Held<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
    _slot: Option<IpSlot>,
}

impl<S> Held<S> {
    pub fn new(inner: S, permit: OwnedSemaphorePermit, slot: Option<IpSlot>) -> Self {
        Self {
            inner,
            _permit: permit,
            _slot: slot,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy)]
struct HeadState {
    /// Requests whose head has arrived and whose response is not produced yet.
    in_flight: usize,
    /// Whether any request head has arrived on this connection.
    served: bool,
    /// When the connection is closed unless a request head completes first; `None` while a
    /// request is in flight or after an upgrade.
    deadline: Option<Instant>,
    upgraded: bool,
}

/// The request-head deadline of one connection. It starts at accept
/// (`server.header_read_timeout_seconds`), is lifted while requests are in flight (bodies have
/// their own deadline, handlers are ours), and restarts when the last in-flight response is
/// produced (`server.keep_alive_timeout_seconds`), so an idle keep-alive connection, a slow
/// next head and a client that never reads its response are all closed in bounded time. An
/// upgrade (101) lifts it for good: the WebSocket has its own idle rules.
#[derive(Clone)]
pub struct HeadDeadline {
    state: Arc<watch::Sender<HeadState>>,
    keep_alive: Duration,
}

/// Which deadline closed a connection (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No complete first request head within `server.header_read_timeout_seconds` of accept.
    Head,
    /// No complete next request head within `server.keep_alive_timeout_seconds`.
    KeepAlive,
}

impl Expired {
    pub fn label(self) -> &'static str {
        match self {
            Self::Head => "head_timeout",
            Self::KeepAlive => "keep_alive_timeout",
        }
    }
}

impl HeadDeadline {
    /// Start the clock at accept.
    pub fn from_accept(head_timeout: Duration, keep_alive: Duration) -> Self {
        let (tx, _) = watch::channel(HeadState {
            in_flight: 0,
            served: false,
            deadline: Some(Instant::now() + head_timeout),
            upgraded: false,
        });
        Self {
            state: Arc::new(tx),
            keep_alive,
        }
    }

    /// A request head has arrived: no head deadline until its response is produced.
    pub fn request_started(&self) -> InFlight {
        self.state.send_modify(|s| {
            s.in_flight += 1;
            s.served = true;
            s.deadline = None;
        });
        InFlight {
            owner: self.clone(),
        }
    }

    /// The connection switched protocols: this deadline no longer applies.
    pub fn upgraded(&self) {
        self.state.send_modify(|s| {
            s.upgraded = true;
            s.deadline = None;
        });
    }

    /// Resolves when the deadline passes (never while requests are in flight or after an
    /// upgrade), saying which one it was.
    pub async fn expired(&self) -> Expired {
        let mut rx = self.state.subscribe();
        loop {
            let state = *rx.borrow_and_update();
            match state.deadline {
                Some(deadline) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {
                            return if state.served { Expired::KeepAlive } else { Expired::Head };
                        }
                        changed = rx.changed() => {
                            if changed.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                }
                None => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

/// One request in flight on a connection; when the last one ends the keep-alive deadline starts.
pub struct InFlight {
    owner: HeadDeadline,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let keep_alive = self.owner.keep_alive;
        self.owner.state.send_modify(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 && !s.upgraded {
                s.deadline = Some(Instant::now() + keep_alive);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn forwarded_for_counts_only_behind_trusted_proxies() {
        let trusted = TrustedProxies::new(vec![
            "10.0.0.0/8".parse().expect("net"),
            "::1/128".parse().expect("net"),
        ]);
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_ip(&trusted, ip("203.0.113.9"), &xff(&["198.51.100.1"])),
            ip("203.0.113.9")
        );
        // Behind a trusted proxy: the rightmost untrusted entry, past further trusted hops;
        // entries a client put in front are not believed.
        assert_eq!(
            client_ip(
                &trusted,
                ip("10.0.0.2"),
                &xff(&["1.1.1.1, 198.51.100.7", "10.0.0.9"])
            ),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(&trusted, ip("10.0.0.2"), &xff(&["[2001:db8::5]:443"])),
            ip("2001:db8::5")
        );
        assert_eq!(
            client_ip(&trusted, ip("10.0.0.2"), &xff(&["198.51.100.3:5555"])),
            ip("198.51.100.3")
        );
        // No header, or garbage: the last address we can vouch for.
        assert_eq!(
            client_ip(&trusted, ip("10.0.0.2"), &HeaderMap::new()),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_ip(&trusted, ip("10.0.0.2"), &xff(&["1.1.1.1, junk, 10.0.0.3"])),
            ip("10.0.0.3")
        );
        // An IPv4-mapped peer is its IPv4 address.
        assert_eq!(
            client_ip(&trusted, ip("::ffff:10.0.0.2"), &xff(&["198.51.100.4"])),
            ip("198.51.100.4")
        );
        assert_eq!(
            client_ip(&trusted, ip("::1"), &xff(&["198.51.100.5"])),
            ip("198.51.100.5")
        );
    }

    #[test]
    fn per_ip_cap_counts_ipv6_by_64_and_frees_slots() {
        let caps = PerIpConnections::new(2);
        let a = caps.try_acquire(ip("2001:db8:1:2::1")).expect("first");
        let _b = caps.try_acquire(ip("2001:db8:1:2::ffff")).expect("second");
        assert!(
            caps.try_acquire(ip("2001:db8:1:2:abcd::9")).is_none(),
            "same /64"
        );
        assert!(
            caps.try_acquire(ip("2001:db8:1:3::1")).is_some(),
            "next /64"
        );
        let _c = caps.try_acquire(ip("192.0.2.1")).expect("v4");
        drop(a);
        assert_eq!(caps.held_by(ip("2001:db8:1:2::1")), 1);
        assert!(caps.try_acquire(ip("2001:db8:1:2::1")).is_some());
        drop(_c);
        assert_eq!(caps.held_by(ip("192.0.2.1")), 0);
        assert!(
            caps.live
                .lock()
                .expect("lock")
                .get(&ip("192.0.2.1"))
                .is_none(),
            "empty entries are removed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn head_deadline_lifts_for_requests_and_restarts_after() {
        let d = HeadDeadline::from_accept(Duration::from_secs(2), Duration::from_secs(5));
        assert_eq!(d.expired().await, Expired::Head);

        let d = HeadDeadline::from_accept(Duration::from_secs(2), Duration::from_secs(5));
        let request = d.request_started();
        let started = Instant::now();
        let watcher = tokio::spawn({
            let d = d.clone();
            async move { d.expired().await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!watcher.is_finished(), "no deadline while a request runs");
        drop(request);
        assert_eq!(watcher.await.expect("join"), Expired::KeepAlive);
        assert!(Instant::now() - started >= Duration::from_secs(65));

        let d = HeadDeadline::from_accept(Duration::from_secs(2), Duration::from_secs(5));
        let request = d.request_started();
        d.upgraded();
        drop(request);
        let expired = tokio::time::timeout(Duration::from_secs(3600), d.expired()).await;
        assert!(
            expired.is_err(),
            "an upgraded connection has no head deadline"
        );
    }
}
