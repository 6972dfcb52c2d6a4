//! Settings, each with three spellings: a flag (`--max-stored-messages`), an
//! environment variable (`DOLORES_MAX_STORED_MESSAGES`) and a key in the file named by
//! `--config` (`max_stored_messages`). A flag beats the environment, which beats the
//! file, which beats the default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::proxy::{TrustedProxies, parse_base_path};

// Where a local server listens and keeps its key, shared with `dolores bench`.
pub use dolores_protocol::local::{API_KEY_FILE, DEFAULT_DATA, DEFAULT_LISTEN};

/// The options every subcommand takes (clap reads flags and `DOLORES_*` variables).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// Address to listen on (serve) or of the server to talk to (clients) [default: 127.0.0.1:8007]
    #[arg(long, env = "DOLORES_LISTEN")]
    pub listen: Option<String>,
    /// Data dir of the embedded store and the generated api key [default: ./dolores-data]
    #[arg(long, env = "DOLORES_DATA")]
    pub data: Option<PathBuf>,
    /// Keep everything in memory: nothing on disk, queues lost on restart
    #[arg(long, env = "DOLORES_MEMORY", num_args = 0..=1, default_missing_value = "true")]
    pub memory: Option<bool>,
    /// Redis URL for several nodes (redis://127.0.0.1:6379/0, or
    /// redis+sentinel://host:port,host:port/mastername)
    #[arg(long, env = "DOLORES_REDIS")]
    pub redis: Option<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis [default: dolores]
    #[arg(long, env = "DOLORES_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Replicas that must have an update before it is acknowledged (Redis WAIT), so a
    /// failover cannot lose it; 0 = off [default: 0]
    #[arg(long, env = "DOLORES_REDIS_MIN_REPLICAS")]
    pub redis_min_replicas: Option<u32>,
    /// The backend's api key (generated on loopback when not given)
    #[arg(long, env = "DOLORES_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Secret for HS256 listener tokens; when set, listeners need ?token=
    #[arg(long, env = "DOLORES_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Time between heartbeat comments on open streams, like 20s [default: 20s]
    #[arg(long, env = "DOLORES_HEARTBEAT", value_parser = humantime::parse_duration)]
    pub heartbeat: Option<Duration>,
    /// How long a WebSocket write may wait for a reader that takes nothing before it is closed with 4008, like 30s [default: 30s]
    #[arg(long, env = "DOLORES_SLOW_READER_TIMEOUT", value_parser = humantime::parse_duration)]
    pub slow_reader_timeout: Option<Duration>,
    /// How long messages are kept for listeners that are away, like 24h [default: 24h]
    #[arg(long, env = "DOLORES_RETENTION", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Most messages kept by the whole store [default: 1000000]
    #[arg(long, env = "DOLORES_MAX_STORED_MESSAGES")]
    pub max_stored_messages: Option<u64>,
    /// A listener not seen for this long is forgotten, like 24h [default: 24h]
    #[arg(long, env = "DOLORES_LISTENER_TTL", value_parser = humantime::parse_duration)]
    pub listener_ttl: Option<Duration>,
    /// How long a listener whose last stream closed stays online, so a reload or reconnect is no offline, like 5s [default: 5s]
    #[arg(long, env = "DOLORES_PRESENCE_GRACE", value_parser = humantime::parse_duration)]
    pub presence_grace: Option<Duration>,
    /// Largest message, serialized as JSON, in bytes [default: 65536]
    #[arg(long, env = "DOLORES_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Origins allowed to use the listener endpoints from a browser, comma-separated
    #[arg(long, env = "DOLORES_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Option<Vec<String>>,
    /// This server's own origins, where the pages that use it are served, comma-separated (like https://app.example) [default: the listen address]
    #[arg(long, env = "DOLORES_PUBLIC_ORIGINS", value_delimiter = ',')]
    pub public_origins: Option<Vec<String>>,
    /// Certificate chain (PEM) to serve HTTPS with HTTP/2; renewed files are picked up
    #[arg(long, env = "DOLORES_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert
    #[arg(long, env = "DOLORES_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve everything under this path prefix, like /dolores, behind a reverse proxy [default: the root]
    #[arg(long, env = "DOLORES_BASE_PATH")]
    pub base_path: Option<String>,
    /// Proxies whose X-Forwarded-For/-Proto/-Host are believed, as CIDR blocks, comma-separated (like 127.0.0.1/32,::1/128)
    #[arg(long, env = "DOLORES_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Longest a request head may take to arrive, and an idle kept-alive connection may
    /// wait for its next request, like 30s [default: 30s]
    #[arg(long, env = "DOLORES_HEAD_TIMEOUT", value_parser = humantime::parse_duration)]
    pub head_timeout: Option<Duration>,
    /// Where to POST webhook events (listener.online, …), like https://app.example/dolores/webhook
    #[arg(long, env = "DOLORES_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Secret that signs webhook events (Dolores-Signature) [default: the api key]
    #[arg(long, env = "DOLORES_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Longest the app may take to answer a webhook before it is tried again, like 10s [default: 10s]
    #[arg(long, env = "DOLORES_WEBHOOK_TIMEOUT", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Option<Duration>,
    /// Longest wait between two tries of a webhook event, like 1m [default: 1m]
    #[arg(long, env = "DOLORES_WEBHOOK_MAX_BACKOFF", value_parser = humantime::parse_duration)]
    pub webhook_max_backoff: Option<Duration>,
    /// Most webhook events kept while the app does not take them; past it the oldest are dropped [default: 100000]
    #[arg(long, env = "DOLORES_WEBHOOK_OUTBOX_MAX")]
    pub webhook_outbox_max: Option<u64>,
    /// A dolores.toml with any of these settings as keys
    #[arg(long, env = "DOLORES_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Which server a client subcommand (`update`, `connect`, `disconnect`, `listen`,
/// `token`) talks to. Only the client options are in their `--help`; the server's
/// settings that change its URL (a TLS certificate, a base path) still come from the
/// environment and the config file, so that a config file names the server it describes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientOptions {
    /// The server to talk to: a URL like http://127.0.0.1:8007 or https://push.example/dolores, or host:port [default: the config file's server, else its listen, else 127.0.0.1:8007]
    // `--listen` is what these subcommands took before: kept, hidden, for old scripts.
    #[arg(long, alias = "listen", env = "DOLORES_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// A dolores.toml to read server (or listen), api_key, token_secret and data from
    #[arg(long, env = "DOLORES_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The backend's api key, for the client subcommands that call the backend API.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyOptions {
    /// The backend's api key [default: the key a local server generated in DATA/api-key]
    #[arg(long, env = "DOLORES_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Data dir of a local server, where it keeps the api key it generated [default: ./dolores-data]
    #[arg(long, env = "DOLORES_DATA")]
    pub data: Option<PathBuf>,
}

impl Options {
    /// The options the `DOLORES_*` variables give, with no flags.
    fn from_env() -> Result<Self, ConfigError> {
        use clap::{Args, FromArgMatches};
        Self::augment_args(clap::Command::new("dolores"))
            .try_get_matches_from(["dolores"])
            .and_then(|matches| Self::from_arg_matches(&matches))
            .map_err(|e| {
                let text = e.to_string();
                let line = text.lines().next().unwrap_or_default();
                ConfigError::Invalid(line.trim_start_matches("error: ").to_owned())
            })
    }
}

/// The keys of `dolores.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    listen: Option<String>,
    server: Option<String>,
    data: Option<PathBuf>,
    memory: Option<bool>,
    redis: Option<String>,
    redis_prefix: Option<String>,
    redis_min_replicas: Option<u32>,
    api_key: Option<String>,
    token_secret: Option<String>,
    heartbeat: Option<String>,
    slow_reader_timeout: Option<String>,
    retention: Option<String>,
    max_stored_messages: Option<u64>,
    listener_ttl: Option<String>,
    presence_grace: Option<String>,
    max_message_bytes: Option<usize>,
    cors_origins: Option<Vec<String>>,
    public_origins: Option<Vec<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    head_timeout: Option<String>,
    base_path: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    webhook_url: Option<String>,
    webhook_secret: Option<String>,
    webhook_timeout: Option<String>,
    webhook_max_backoff: Option<String>,
    webhook_outbox_max: Option<u64>,
}

/// Every setting, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address to listen on or to reach.
    pub listen: String,
    /// The server the client subcommands talk to, when not the one at `listen`: a URL
    /// or `host:port`.
    pub server: Option<String>,
    /// The data dir.
    pub data: PathBuf,
    /// Nothing on disk.
    pub memory: bool,
    /// Redis URL, for several nodes.
    pub redis: Option<String>,
    /// Prefix of the Redis keys.
    pub redis_prefix: String,
    /// Replicas an append waits for (`WAIT`); 0 = none.
    pub redis_min_replicas: u32,
    /// The api key, if given.
    pub api_key: Option<String>,
    /// The token secret, if any.
    pub token_secret: Option<String>,
    /// Heartbeat interval on open streams.
    pub heartbeat: Duration,
    /// How long a WebSocket write may wait for its reader before the socket is closed
    /// with 4008.
    pub slow_reader_timeout: Duration,
    /// How long messages are kept.
    pub retention: Duration,
    /// Most messages kept.
    pub max_stored_messages: u64,
    /// How long an unseen listener is kept.
    pub listener_ttl: Duration,
    /// How long presence waits before it reports a listener offline (or a track
    /// vacated): a page reload or a reconnect within it is neither.
    pub presence_grace: Duration,
    /// Largest message in bytes.
    pub max_message_bytes: usize,
    /// Allowed browser origins.
    pub cors_origins: Vec<String>,
    /// The server's own origins (empty: those of the listen address).
    pub public_origins: Vec<String>,
    /// Certificate and key for HTTPS, when both are set.
    pub tls: Option<crate::tls::CertFiles>,
    /// Longest a request head may take, and an idle kept-alive connection may wait.
    pub head_timeout: Duration,
    /// The prefix every route is served under: empty (the root) or like `/dolores`.
    pub base_path: String,
    /// The proxies whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: TrustedProxies,
    /// Where webhook events are POSTed; none: no webhooks.
    pub webhook_url: Option<String>,
    /// The key that signs webhook events; none: the api key.
    pub webhook_secret: Option<String>,
    /// Longest the app may take to answer one webhook request.
    pub webhook_timeout: Duration,
    /// Longest wait between two tries of one webhook event.
    pub webhook_max_backoff: Duration,
    /// Most webhook events kept unsent; past it the oldest are dropped.
    pub webhook_outbox_max: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.into(),
            server: None,
            data: DEFAULT_DATA.into(),
            memory: false,
            redis: None,
            redis_prefix: "dolores".into(),
            redis_min_replicas: 0,
            api_key: None,
            token_secret: None,
            // Below the 30–60 s idle timeouts of common proxies and load balancers.
            heartbeat: Duration::from_secs(20),
            // Generous: a phone on a bad network is slow, not gone.
            slow_reader_timeout: Duration::from_secs(30),
            // A day covers a laptop closed overnight.
            retention: Duration::from_secs(24 * 3600),
            // About 100 MB of small messages: plenty of backlog, bounded disk.
            max_stored_messages: 1_000_000,
            listener_ttl: Duration::from_secs(24 * 3600),
            // A page reload or a reconnect after a network blip takes a second or two.
            presence_grace: Duration::from_secs(5),
            // Push servers carry notices, not documents.
            max_message_bytes: 64 * 1024,
            cors_origins: Vec::new(),
            public_origins: Vec::new(),
            tls: None,
            // Generous for a phone on a bad network; short enough that a client holding
            // connections open without finishing a request runs out of patience first.
            head_timeout: Duration::from_secs(30),
            base_path: String::new(),
            trusted_proxies: TrustedProxies::default(),
            webhook_url: None,
            webhook_secret: None,
            // Long enough for an app that does real work per event (a database write),
            // short enough that a hung app is tried again within seconds.
            webhook_timeout: Duration::from_secs(10),
            // Once the app is back, events flow again within a minute.
            webhook_max_backoff: Duration::from_secs(60),
            // A day of a busy site's comings and goings while the app is down, in a
            // few tens of MB: an event is ~150 bytes.
            webhook_outbox_max: 100_000,
        }
    }
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    // Not a `source` field: anyhow's `{:#}` prints the source after the Display, and
    // the Display already says why (it would read "… (os error 2): … (os error 2)").
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The config file is not valid.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

fn duration(
    path: &Path,
    key: &str,
    value: Option<String>,
) -> Result<Option<Duration>, ConfigError> {
    value
        .map(|v| {
            humantime::parse_duration(&v).map_err(|e| ConfigError::File {
                path: path.to_owned(),
                message: format!("{key} = {v:?}: {e} (write durations like 20s, 15m, 24h)"),
            })
        })
        .transpose()
}

impl Settings {
    /// Resolves flags and environment (already in `options`) over the config file over
    /// the defaults.
    pub fn resolve(options: &Options) -> Result<Self, ConfigError> {
        let mut file = FileSettings::default();
        let path = options.config.clone().unwrap_or_default();
        if let Some(config) = &options.config {
            let text = std::fs::read_to_string(config).map_err(|error| ConfigError::Read {
                path: config.clone(),
                error,
            })?;
            file = toml::from_str(&text).map_err(|e| ConfigError::File {
                path: config.clone(),
                message: toml_message(&text, &e),
            })?;
        }
        let d = Settings::default();
        let o = options.clone();
        let settings = Settings {
            listen: o.listen.or(file.listen).unwrap_or(d.listen),
            server: file.server.filter(|s| !s.is_empty()),
            data: o.data.or(file.data).unwrap_or(d.data),
            memory: o.memory.or(file.memory).unwrap_or(d.memory),
            redis: o.redis.or(file.redis).filter(|r| !r.is_empty()),
            redis_prefix: o
                .redis_prefix
                .or(file.redis_prefix)
                .unwrap_or(d.redis_prefix),
            redis_min_replicas: o
                .redis_min_replicas
                .or(file.redis_min_replicas)
                .unwrap_or(d.redis_min_replicas),
            api_key: o.api_key.or(file.api_key).filter(|k| !k.is_empty()),
            // An empty secret is a mistake (an unset variable), not "no auth": refused
            // in `check`, never taken as auth turned off.
            token_secret: o.token_secret.or(file.token_secret),
            heartbeat: o
                .heartbeat
                .or(duration(&path, "heartbeat", file.heartbeat)?)
                .unwrap_or(d.heartbeat),
            slow_reader_timeout: o
                .slow_reader_timeout
                .or(duration(
                    &path,
                    "slow_reader_timeout",
                    file.slow_reader_timeout,
                )?)
                .unwrap_or(d.slow_reader_timeout),
            retention: o
                .retention
                .or(duration(&path, "retention", file.retention)?)
                .unwrap_or(d.retention),
            max_stored_messages: o
                .max_stored_messages
                .or(file.max_stored_messages)
                .unwrap_or(d.max_stored_messages),
            listener_ttl: o
                .listener_ttl
                .or(duration(&path, "listener_ttl", file.listener_ttl)?)
                .unwrap_or(d.listener_ttl),
            presence_grace: o
                .presence_grace
                .or(duration(&path, "presence_grace", file.presence_grace)?)
                .unwrap_or(d.presence_grace),
            max_message_bytes: o
                .max_message_bytes
                .or(file.max_message_bytes)
                .unwrap_or(d.max_message_bytes),
            // "https://a.example, https://b.example" means two origins, spaces aside.
            cors_origins: o
                .cors_origins
                .or(file.cors_origins)
                .map(|list| list.iter().map(|o| o.trim().to_owned()).collect())
                .unwrap_or(d.cors_origins),
            public_origins: o
                .public_origins
                .or(file.public_origins)
                .map(|list| list.iter().map(|o| o.trim().to_owned()).collect())
                .unwrap_or(d.public_origins),
            tls: match (o.tls_cert.or(file.tls_cert), o.tls_key.or(file.tls_key)) {
                (Some(cert), Some(key)) => Some(crate::tls::CertFiles { cert, key }),
                (None, None) => None,
                _ => {
                    return Err(ConfigError::Invalid(
                        "tls_cert and tls_key go together: set both, or neither".into(),
                    ));
                }
            },
            head_timeout: o
                .head_timeout
                .or(duration(&path, "head_timeout", file.head_timeout)?)
                .unwrap_or(d.head_timeout),
            base_path: match o.base_path.or(file.base_path) {
                Some(raw) => parse_base_path(&raw).map_err(ConfigError::Invalid)?,
                None => d.base_path,
            },
            trusted_proxies: match o.trusted_proxies.or(file.trusted_proxies) {
                Some(list) => TrustedProxies::parse(&list).map_err(ConfigError::Invalid)?,
                None => d.trusted_proxies,
            },
            webhook_url: o.webhook_url.or(file.webhook_url).filter(|u| !u.is_empty()),
            // Empty is refused in `check`, like token_secret.
            webhook_secret: o.webhook_secret.or(file.webhook_secret),
            webhook_timeout: o
                .webhook_timeout
                .or(duration(&path, "webhook_timeout", file.webhook_timeout)?)
                .unwrap_or(d.webhook_timeout),
            webhook_max_backoff: o
                .webhook_max_backoff
                .or(duration(
                    &path,
                    "webhook_max_backoff",
                    file.webhook_max_backoff,
                )?)
                .unwrap_or(d.webhook_max_backoff),
            webhook_outbox_max: o
                .webhook_outbox_max
                .or(file.webhook_outbox_max)
                .unwrap_or(d.webhook_outbox_max),
        };
        settings.check()?;
        Ok(settings)
    }

    /// Resolves the settings of a client subcommand: its own options (flags and their
    /// variables) over the other `DOLORES_*` variables over the config file over the
    /// defaults. The server is `--server` (`DOLORES_SERVER`), else the file's `server`,
    /// else the one at `listen`.
    pub fn resolve_client(
        client: &ClientOptions,
        key: Option<&KeyOptions>,
        token_secret: Option<String>,
    ) -> Result<Self, ConfigError> {
        let env = Options::from_env()?;
        let key = key.cloned().unwrap_or_default();
        let options = Options {
            config: client.config.clone(),
            api_key: key.api_key,
            data: key.data,
            token_secret,
            ..env
        };
        let mut settings = Self::resolve(&options)?;
        if let Some(server) = client.server.clone().filter(|s| !s.is_empty()) {
            settings.server = Some(server);
        }
        Ok(settings)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.heartbeat < Duration::from_millis(100) {
            return invalid("heartbeat must be at least 100ms");
        }
        if self.head_timeout < Duration::from_millis(100) {
            return invalid("head_timeout must be at least 100ms");
        }
        if self.slow_reader_timeout < Duration::from_millis(100) {
            return invalid("slow_reader_timeout must be at least 100ms");
        }
        if self.retention.is_zero() || self.listener_ttl.is_zero() {
            return invalid("retention and listener_ttl must be longer than zero");
        }
        if self.max_stored_messages == 0 {
            return invalid("max_stored_messages must be at least 1");
        }
        if !(16..=16 * 1024 * 1024).contains(&self.max_message_bytes) {
            return invalid("max_message_bytes must be between 16 and 16777216");
        }
        if self
            .token_secret
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            return invalid(
                "token_secret is empty: set a secret, or leave the setting out to run without listener tokens",
            );
        }
        self.check_webhooks()?;
        if self.memory && self.redis.is_some() {
            return invalid("choose --memory or --redis, not both");
        }
        if self.redis_min_replicas > 0 && self.redis.is_none() {
            return invalid(
                "--redis-min-replicas waits for Redis replicas: it needs --redis \
                 (the embedded store syncs to its own disk instead)",
            );
        }
        check_listen(&self.listen)?;
        for origin in &self.cors_origins {
            check_origin("cors_origins", origin)?;
        }
        for origin in &self.public_origins {
            if origin == "*" || origin == "null" {
                return invalid(&format!(
                    "public_origins {origin:?}: list this server's own origins, like \
                     https://app.example; pages of any other site go in cors_origins"
                ));
            }
            check_origin("public_origins", origin)?;
        }
        // Only a dir can hold the store and the key file; a file would fail later, in a
        // message about the store.
        if !self.memory && self.data.exists() && !self.data.is_dir() {
            return Err(ConfigError::Invalid(format!(
                "data = {}: that is a file; the data dir must be a directory (or not exist yet)",
                self.data.display()
            )));
        }
        Ok(())
    }

    fn check_webhooks(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self
            .webhook_secret
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            return invalid(
                "webhook_secret is empty: set a secret, or leave the setting out to sign webhooks with the api key",
            );
        }
        if self.webhook_timeout < Duration::from_millis(100) {
            return invalid("webhook_timeout must be at least 100ms");
        }
        if self.webhook_max_backoff < Duration::from_millis(100) {
            return invalid("webhook_max_backoff must be at least 100ms");
        }
        if self.webhook_outbox_max == 0 {
            return invalid("webhook_outbox_max must be at least 1");
        }
        if let Some(url) = &self.webhook_url {
            let scheme = reqwest::Url::parse(url).map(|u| u.scheme().to_owned());
            match scheme.as_deref() {
                Ok("http" | "https") => {}
                Ok(other) => {
                    return invalid(&format!(
                        "webhook_url {url:?}: the app is reached over http:// or https://, not {other}://"
                    ));
                }
                Err(e) => {
                    return invalid(&format!(
                        "webhook_url {url:?}: {e}; write a URL like https://app.example/dolores/webhook"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The base URL a client uses to reach the server at `server`, else at `listen`: a
    /// URL as it is (its path is where the server is), else `http://` + the address +
    /// `base_path`.
    pub fn server_url(&self) -> String {
        let listen = self.server.as_deref().unwrap_or(&self.listen);
        let listen = listen.trim_end_matches('/');
        if listen.starts_with("http://") || listen.starts_with("https://") {
            return listen.to_owned();
        }
        // A server bound to every interface is reached on loopback from here.
        let listen = listen
            .replace("0.0.0.0:", "127.0.0.1:")
            .replace("[::]:", "[::1]:");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{listen}{}", self.base_path)
    }

    /// The path of the generated api key file.
    pub fn api_key_file(&self) -> PathBuf {
        self.data.join(API_KEY_FILE)
    }
}

/// A toml error on one line: the line it is on and what is wrong (toml's own text
/// quotes the file over several lines).
fn toml_message(text: &str, error: &toml::de::Error) -> String {
    let what = error.message().lines().collect::<Vec<_>>().join(" ");
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let number = before.matches('\n').count() + 1;
            let line = text.lines().nth(number - 1).unwrap_or_default().trim();
            format!("line {number}, `{line}`: {what}")
        }
        None => what,
    }
}

/// `listen` is an address with a port, `host:port`; a lone port or a URL never binds.
fn check_listen(listen: &str) -> Result<(), ConfigError> {
    let invalid = |why: String| Err(ConfigError::Invalid(format!("listen = {listen:?}: {why}")));
    if !listen.is_empty() && listen.bytes().all(|b| b.is_ascii_digit()) {
        return invalid(format!(
            "a port alone; write it as 127.0.0.1:{listen} (or 0.0.0.0:{listen} for every interface)"
        ));
    }
    if listen.contains("://") {
        return invalid(
            "a URL; write the address to listen on, like 127.0.0.1:8007 (the client \
             subcommands name a server with --server URL)"
                .into(),
        );
    }
    let Some((host, port)) = listen.rsplit_once(':') else {
        return invalid("no port; write it as host:port, like 127.0.0.1:8007".into());
    };
    if host.is_empty() {
        return invalid(format!("no host; write it as 127.0.0.1:{port}"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return invalid("write an IPv6 address in brackets, like [::1]:8007".into());
    }
    if port.parse::<u16>().is_err() {
        return invalid(format!(
            "{port:?} is not a port (0 to 65535); write it as host:port, like 127.0.0.1:8007"
        ));
    }
    Ok(())
}

/// An entry of `cors_origins` is `*` or what a browser sends as `Origin`:
/// `scheme://host[:port]`, nothing after. Anything else matches no page ever.
fn check_origin(setting: &str, origin: &str) -> Result<(), ConfigError> {
    let invalid = |why: String| Err(ConfigError::Invalid(format!("{setting} {origin:?}: {why}")));
    // `null` is what sandboxed pages and file:// pages send.
    if origin == "*" || origin == "null" {
        return Ok(());
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        let bare = origin.trim_end_matches('/');
        return invalid(format!(
            "no scheme; a browser sends its origin with one: write it as http://{bare} (or \
             https://{bare})"
        ));
    };
    if scheme != "http" && scheme != "https" {
        return invalid(format!(
            "a browser origin starts with http:// or https://, not {scheme}://"
        ));
    }
    // A trailing slash is forgiven where origins are compared; a path never matches.
    let host = rest.strip_suffix('/').unwrap_or(rest);
    if host.is_empty() || host.contains(['/', '?', '#', ' ', '*']) {
        let hint = host.split(['/', '?', '#']).next().unwrap_or_default();
        return invalid(if host.contains('*') {
            "* works only alone, for every origin; list each origin otherwise".into()
        } else if hint.is_empty() {
            "no host; write it like https://app.example".into()
        } else {
            format!("an origin has no path: write it as {scheme}://{hint}")
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dolores.toml");
        std::fs::write(
            &path,
            "heartbeat = \"5s\"\nmax_stored_messages = 10\nlisten = \"127.0.0.1:9\"\n",
        )
        .expect("write");
        let options = Options {
            config: Some(path),
            listen: Some("127.0.0.1:1".into()),
            ..Options::default()
        };
        let s = Settings::resolve(&options).expect("valid");
        assert_eq!(s.listen, "127.0.0.1:1");
        assert_eq!(s.heartbeat, Duration::from_secs(5));
        assert_eq!(s.max_stored_messages, 10);
        assert_eq!(s.retention, Duration::from_secs(86400));
    }

    #[test]
    fn slow_reader_timeout_comes_from_the_file_and_is_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dolores.toml");
        std::fs::write(&path, "slow_reader_timeout = \"2s\"\n").expect("write");
        let options = Options {
            config: Some(path),
            ..Options::default()
        };
        let s = Settings::resolve(&options).expect("valid");
        assert_eq!(s.slow_reader_timeout, Duration::from_secs(2));
        assert_eq!(
            Settings::default().slow_reader_timeout,
            Duration::from_secs(30)
        );
        let too_short = Options {
            slow_reader_timeout: Some(Duration::from_millis(10)),
            ..options
        };
        let e = Settings::resolve(&too_short).unwrap_err().to_string();
        assert!(e.contains("slow_reader_timeout"), "{e}");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dolores.toml");
        std::fs::write(&path, "hartbeat = \"5s\"\n").expect("write");
        let options = Options {
            config: Some(path),
            ..Options::default()
        };
        let e = Settings::resolve(&options).unwrap_err().to_string();
        assert!(e.contains("hartbeat"), "{e}");
    }

    #[test]
    fn base_path_and_trusted_proxies_come_from_the_file_and_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dolores.toml");
        std::fs::write(
            &path,
            "base_path = \"/dolores/\"\ntrusted_proxies = [\"127.0.0.1/32\", \"::1/128\"]\n",
        )
        .expect("write");
        let options = Options {
            config: Some(path.clone()),
            ..Options::default()
        };
        let s = Settings::resolve(&options).expect("valid");
        assert_eq!(s.base_path, "/dolores");
        assert!(s.trusted_proxies.contains("::1".parse().expect("ip")));
        assert_eq!(s.server_url(), "http://127.0.0.1:8007/dolores");

        let bad_path = Options {
            base_path: Some("dolores".into()),
            ..options.clone()
        };
        let e = Settings::resolve(&bad_path).unwrap_err().to_string();
        assert!(e.contains("must start with /"), "{e}");
        let bad_block = Options {
            trusted_proxies: Some(vec!["10.0.0.1/8".into()]),
            ..options
        };
        let e = Settings::resolve(&bad_block).unwrap_err().to_string();
        assert!(
            e.contains("trusted_proxies") && e.contains("10.0.0.0/8"),
            "{e}"
        );
    }

    #[test]
    fn listen_is_host_and_port() {
        for good in [
            "127.0.0.1:0",
            "0.0.0.0:8007",
            "[::1]:8007",
            "localhost:9000",
        ] {
            assert!(check_listen(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("9000", "write it as 127.0.0.1:9000"),
            ("http://127.0.0.1:9000", "a URL"),
            ("localhost", "no port"),
            (":9000", "write it as 127.0.0.1:9000"),
            ("::1:9000", "brackets"),
            ("127.0.0.1:http", "not a port"),
            ("127.0.0.1:70000", "not a port"),
        ] {
            let e = check_listen(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn cors_origins_are_origins() {
        for good in ["*", "null", "http://127.0.0.1:8081", "https://app.example/"] {
            assert!(check_origin("cors_origins", good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("127.0.0.1:8081", "write it as http://127.0.0.1:8081"),
            ("app.example/", "write it as http://app.example "),
            ("ftp://app.example", "not ftp://"),
            (
                "https://app.example/page",
                "write it as https://app.example",
            ),
            ("https://*.example", "* works only alone"),
            ("https://", "no host"),
        ] {
            let e = check_origin("cors_origins", bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
