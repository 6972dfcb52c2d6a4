//! The plan of a run, decided before anything is sent: the run id, the targets (each
//! checked to be on loopback), every listener's uid, tracks and stream URL, and every
//! publisher's share and endpoint.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use dolores_protocol::api::{self as paths, MAX_BATCH};
use dolores_protocol::local::{API_KEY_FILE, DEFAULT_DATA, DEFAULT_LISTEN};

use super::listener::ListenerSpec;
use super::wire::Payload;
use super::{BenchArgs, Transport};

/// A server the run targets.
#[derive(Debug, Clone)]
pub(super) struct Server {
    /// `http://host:port`, as given (normalized).
    pub(super) base: String,
}

/// Where a URL's connections go: resolved once per `host:port`.
#[derive(Debug, Default)]
struct Resolver {
    cache: HashMap<String, SocketAddr>,
}

/// The loopback check, on a URL's host.
fn loopback_host(host: &str) -> Option<LoopbackHost> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<Ipv4Addr>() {
        return ip.is_loopback().then_some(LoopbackHost::Ip(IpAddr::V4(ip)));
    }
    if let Ok(ip) = bare.parse::<Ipv6Addr>() {
        return ip.is_loopback().then_some(LoopbackHost::Ip(IpAddr::V6(ip)));
    }
    bare.eq_ignore_ascii_case("localhost")
        .then_some(LoopbackHost::Localhost)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoopbackHost {
    Ip(IpAddr),
    Localhost,
}

fn refuse(url: &str) -> anyhow::Error {
    anyhow!(
        "refusing to target {url}: dolores bench only loads loopback servers \
         (127.0.0.0/8, ::1 or localhost), never another host"
    )
}

/// Parses `text` as an http(s)-less URL on loopback.
fn loopback_url(text: &str, schemes: &[&str]) -> anyhow::Result<reqwest::Url> {
    let url = reqwest::Url::parse(text).map_err(|e| anyhow!("{text:?} is not a URL: {e}"))?;
    let host = url.host_str().unwrap_or("");
    if loopback_host(host).is_none() {
        return Err(refuse(text));
    }
    if !schemes.contains(&url.scheme()) {
        bail!(
            "{text}: dolores bench speaks {} here, not {}",
            schemes.join(" or "),
            url.scheme()
        );
    }
    Ok(url)
}

impl Resolver {
    /// The address to connect to for `url` (already checked to be on loopback).
    async fn resolve(&mut self, url: &reqwest::Url) -> anyhow::Result<SocketAddr> {
        let host = url.host_str().unwrap_or("");
        let port = url.port_or_known_default().unwrap_or(80);
        let key = format!("{host}:{port}");
        if let Some(addr) = self.cache.get(&key) {
            return Ok(*addr);
        }
        let addr = match loopback_host(host) {
            Some(LoopbackHost::Ip(ip)) => SocketAddr::new(ip, port),
            Some(LoopbackHost::Localhost) => {
                let found: Vec<SocketAddr> = tokio::net::lookup_host(("localhost", port))
                    .await
                    .with_context(|| format!("cannot resolve localhost for {url}"))?
                    .filter(|a| a.ip().is_loopback())
                    .collect();
                found
                    .iter()
                    .find(|a| a.is_ipv4())
                    .or(found.first())
                    .copied()
                    .ok_or_else(|| anyhow!("localhost does not resolve to a loopback address"))?
            }
            None => return Err(refuse(url.as_str())),
        };
        self.cache.insert(key, addr);
        Ok(addr)
    }
}

fn normalize_server(text: &str) -> String {
    let text = text.trim().trim_end_matches('/');
    if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    }
}

/// Everything decided before the run starts.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) run: String,
    pub(super) servers: Vec<Server>,
    pub(super) names: Vec<String>,
    pub(super) listeners: Vec<ListenerSpec>,
    pub(super) publishers: Vec<PublisherSpec>,
    pub(super) sources: Vec<IpAddr>,
    pub(super) api_key: Option<String>,
    pub(super) settle: Duration,
}

/// One publisher's share of the work.
#[derive(Debug, Clone)]
pub(super) struct PublisherSpec {
    pub(super) index: usize,
    pub(super) count: u64,
    pub(super) endpoint: Endpoint,
}

/// Where a publisher sends its messages.
#[derive(Debug, Clone)]
pub(super) enum Endpoint {
    /// Dolores' `/api/v1/update`.
    Dolores { url: String, key: String },
    /// A foreign server: a URL per track and a body template.
    Foreign {
        urls: Vec<String>,
        body: String,
        headers: Vec<(String, String)>,
    },
}

fn api_key(args: &BenchArgs) -> anyhow::Result<String> {
    let data = args.data.clone().unwrap_or_else(|| DEFAULT_DATA.into());
    Ok(dolores_protocol::local::api_key_or_file(
        args.api_key.as_deref().filter(|k| !k.is_empty()),
        &data.join(API_KEY_FILE),
    )?)
}

fn check_args(args: &BenchArgs) -> anyhow::Result<()> {
    if args.listeners == 0 || args.tracks == 0 || args.publishers == 0 || args.messages == 0 {
        bail!("--listeners, --tracks, --publishers and --messages must each be at least 1");
    }
    if args.tracks_per_listener == 0 || args.tracks_per_listener > args.tracks {
        bail!(
            "--tracks-per-listener must be from 1 to --tracks ({})",
            args.tracks
        );
    }
    if args.batch == 0 || args.batch > MAX_BATCH {
        bail!("--batch must be from 1 to {MAX_BATCH}");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of messages per second");
    }
    if args.open_concurrency == 0 {
        bail!("--open-concurrency must be at least 1");
    }
    if args.timeout.is_zero() {
        bail!("--timeout must be longer than zero");
    }
    if args.listen_url.is_some() {
        if args.transport == Transport::POLL {
            bail!("--listen-url works with --transport sse or ws (long-poll is Dolores' own)");
        }
        if args.tracks_per_listener != 1 {
            bail!("--listen-url takes one track per listener (--tracks-per-listener 1)");
        }
    }
    if args.publish_url.is_some() && args.batch != 1 {
        bail!("--batch is Dolores' batch update; it does not go with --publish-url");
    }
    Ok(())
}

pub(super) fn expand(template: &str, pairs: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in pairs {
        out = out.replace(name, value);
    }
    out
}

/// The padding field's value for `--payload-bytes`.
pub(super) fn padding(payload_bytes: usize) -> String {
    let bare = Payload {
        s: u64::from(u32::MAX) * 1000,
        p: 0,
        g: 0,
        t: 0,
        i: 0,
    }
    .to_json("")
    .len();
    // `,"x":""` adds 7 bytes around the padding.
    "x".repeat(payload_bytes.saturating_sub(bare + 7))
}

pub(super) async fn plan(args: &BenchArgs) -> anyhow::Result<Plan> {
    check_args(args)?;
    let mut resolver = Resolver::default();
    let servers: Vec<String> = if args.servers.is_empty() {
        vec![normalize_server(DEFAULT_LISTEN)]
    } else {
        args.servers.iter().map(|s| normalize_server(s)).collect()
    };
    let mut checked = Vec::new();
    for base in servers {
        let url = loopback_url(&base, &["http"])?;
        resolver.resolve(&url).await?;
        checked.push(Server { base });
    }
    let servers = checked;
    let run = format!("{:08x}", rand::random::<u32>());
    let names: Vec<String> = (0..args.tracks)
        .map(|t| format!("bench-{run}-t{t}"))
        .collect();
    let sources: Vec<IpAddr> = (0..args.source_addrs)
        .map(|j| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + j)))
        .take(args.listeners)
        .collect();

    let mut listeners = Vec::with_capacity(args.listeners);
    let ws_scheme = args.transport == Transport::WS;
    for n in 0..args.listeners {
        let server = &servers[n % servers.len()];
        let uid = format!("bench-{run}-{n}");
        // Listener n's tracks: consecutive from a start that walks past every server.
        let first = (n / servers.len()) % args.tracks;
        let tracks: Vec<u32> = (0..args.tracks_per_listener)
            .map(|k| u32::try_from((first + k) % args.tracks).unwrap_or(u32::MAX))
            .collect();
        let text = match &args.listen_url {
            Some(template) => expand(
                template,
                &[
                    ("{server}", &server.base),
                    ("{uid}", &uid),
                    ("{track}", &names[tracks[0] as usize]),
                    ("{index}", &n.to_string()),
                ],
            ),
            None => format!("{}{}{uid}", server.base, args.transport.0.prefix()),
        };
        let schemes: &[&str] = if ws_scheme {
            &["http", "ws"]
        } else {
            &["http"]
        };
        let url = loopback_url(&text, schemes)?;
        let addr = resolver.resolve(&url).await?;
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or("")),
            None => url.host_str().unwrap_or("").to_owned(),
        };
        let target = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        let source = match addr.ip() {
            IpAddr::V4(_) if !sources.is_empty() => Some(sources[n % sources.len()]),
            _ => None,
        };
        listeners.push(ListenerSpec {
            uid,
            addr,
            host,
            target,
            source,
            tracks,
        });
    }

    let needs_key = !args.no_connect || args.publish_url.is_none();
    let api_key = if needs_key {
        Some(api_key(args)?)
    } else {
        None
    };
    let per_publisher = args.messages / args.publishers as u64;
    let extra = args.messages % args.publishers as u64;
    let mut publishers = Vec::with_capacity(args.publishers);
    for index in 0..args.publishers {
        let server = &servers[index % servers.len()];
        let endpoint = match &args.publish_url {
            None => Endpoint::Dolores {
                url: format!("{}{}", server.base, paths::UPDATE),
                key: api_key.clone().unwrap_or_default(),
            },
            Some(template) => {
                let mut urls = Vec::with_capacity(names.len());
                for name in &names {
                    let text = expand(template, &[("{server}", &server.base), ("{track}", name)]);
                    loopback_url(&text, &["http"])?;
                    urls.push(text);
                }
                let headers = args
                    .publish_header
                    .iter()
                    .map(|h| {
                        h.split_once(':')
                            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                            .ok_or_else(|| {
                                anyhow!("--publish-header {h:?}: write it as 'Name: value'")
                            })
                    })
                    .collect::<anyhow::Result<_>>()?;
                Endpoint::Foreign {
                    urls,
                    body: args.publish_body.clone(),
                    headers,
                }
            }
        };
        publishers.push(PublisherSpec {
            index,
            count: per_publisher + u64::from((index as u64) < extra),
            endpoint,
        });
    }
    let settle = args.settle.unwrap_or(if args.no_connect {
        Duration::from_secs(1)
    } else {
        Duration::ZERO
    });
    Ok(Plan {
        run,
        servers,
        names,
        listeners,
        publishers,
        sources,
        api_key,
        settle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_targets() {
        for ok in [
            "http://127.0.0.1:8007",
            "http://127.9.8.7",
            "http://localhost:1",
            "http://LOCALHOST:1",
            "http://[::1]:8007",
        ] {
            assert!(loopback_url(ok, &["http"]).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8007",
            "http://192.168.1.1",
            "http://example.com",
            "http://[::2]:1",
            "http://localhost.example.com",
            "http://0.0.0.0:8007",
        ] {
            let e = loopback_url(bad, &["http"]).expect_err(bad).to_string();
            assert!(e.contains("only loads loopback"), "{e}");
        }
        assert!(loopback_url("https://127.0.0.1", &["http"]).is_err());
    }

    #[test]
    fn padding_makes_messages_about_the_size_asked() {
        let pad = padding(200);
        let json = Payload {
            s: 1_000_000_000,
            p: 1,
            g: 2,
            t: 0,
            i: 2,
        }
        .to_json(&pad);
        assert!((180..=200).contains(&json.len()), "{}", json.len());
        assert_eq!(padding(0), "");
    }
}
