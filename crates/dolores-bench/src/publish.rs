//! The publishers: each sends its share of the messages, at a fixed rate or as fast as
//! it is answered, to Dolores' `/api/v1/update` or a foreign server's URL.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant as TokioInstant;

use super::listener::Shared;
use super::plan::{Endpoint, Plan, PublisherSpec, expand, padding};
use super::wire::Payload;
use super::{BenchArgs, causes};

/// How one publisher did.
#[derive(Debug, Default)]
pub(super) struct Published {
    /// Messages stored, per track.
    pub(super) ok: Vec<u64>,
    /// Messages whose request failed.
    pub(super) failed: u64,
    /// Requests sent.
    pub(super) requests: u64,
    /// When the first request went out, ns since the start.
    pub(super) first_send_ns: Option<u64>,
    /// When the last answer came, ns since the start.
    pub(super) last_ack_ns: u64,
    /// The first failure.
    pub(super) error: Option<String>,
}

/// Runs one publisher until its share is sent or the deadline.
async fn publish(
    spec: PublisherSpec,
    shared: Arc<Shared>,
    client: reqwest::Client,
    args: Arc<BenchArgs>,
    began: TokioInstant,
    deadline: TokioInstant,
) -> Published {
    let tracks = shared.names.len();
    let mut out = Published {
        ok: vec![0; tracks],
        ..Published::default()
    };
    let mut next_i = vec![0u64; tracks];
    let per_request = args.batch as u64;
    let pad = padding(args.payload_bytes);
    // Each request carries `per_request` messages; spread the publishers' start over
    // one interval so their requests interleave.
    let interval = args
        .rate
        .map(|rate| Duration::from_secs_f64(per_request as f64 * args.publishers as f64 / rate));
    let offset = interval.map(|i| i.mul_f64(spec.index as f64 / args.publishers as f64));
    let p = u32::try_from(spec.index).unwrap_or(u32::MAX);
    let mut g = 0u64;
    let mut request = 0u32;
    while g < spec.count {
        if let (Some(interval), Some(offset)) = (interval, offset) {
            let at = began + offset + interval * request;
            if at >= deadline {
                break;
            }
            tokio::time::sleep_until(at).await;
        }
        if TokioInstant::now() >= deadline {
            break;
        }
        request += 1;
        let n = per_request.min(spec.count - g);
        let s = shared.now_ns();
        let mut sent_tracks = Vec::with_capacity(n as usize);
        let mut items = Vec::with_capacity(n as usize);
        for k in 0..n {
            let t = (spec.index as u64 + g + k) as usize % tracks;
            let payload = Payload {
                s,
                p,
                g: g + k,
                t: u32::try_from(t).unwrap_or(u32::MAX),
                i: next_i[t],
            };
            next_i[t] += 1;
            sent_tracks.push(t);
            items.push(payload.to_json(&pad));
        }
        g += n;
        let call = send(&spec.endpoint, &client, &shared.names, &sent_tracks, &items);
        out.first_send_ns.get_or_insert(s);
        out.requests += 1;
        let result = match tokio::time::timeout_at(deadline, call).await {
            Ok(result) => result,
            Err(_) => Err("no answer before --timeout".into()),
        };
        match result {
            Ok(()) => {
                out.last_ack_ns = shared.now_ns();
                for t in sent_tracks {
                    out.ok[t] += 1;
                }
            }
            Err(e) => {
                out.failed += n;
                out.error.get_or_insert(e);
            }
        }
    }
    out
}

/// Sends one request; `Err` says why it failed.
async fn send(
    endpoint: &Endpoint,
    client: &reqwest::Client,
    names: &[String],
    tracks: &[usize],
    items: &[String],
) -> Result<(), String> {
    let request = match endpoint {
        Endpoint::Dolores { url, key } => {
            let body = if items.len() == 1 {
                format!(
                    r#"{{"track":"{}","message":{}}}"#,
                    names[tracks[0]], items[0]
                )
            } else {
                let mut body = String::from(r#"{"updates":["#);
                for (k, (t, item)) in tracks.iter().zip(items).enumerate() {
                    if k > 0 {
                        body.push(',');
                    }
                    let _ = write!(body, r#"{{"track":"{}","message":{item}}}"#, names[*t]);
                }
                body.push_str("]}");
                body
            };
            client
                .post(url)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(body)
        }
        Endpoint::Foreign {
            urls,
            body,
            headers,
        } => {
            let message = &items[0];
            let escaped = serde_json::to_string(message).unwrap_or_default();
            let escaped = escaped.trim_start_matches('"').trim_end_matches('"');
            let name = &names[tracks[0]];
            let body = expand(
                body,
                &[
                    ("{message_escaped}", escaped),
                    ("{message}", message),
                    ("{track}", name),
                ],
            );
            let mut request = client
                .post(&urls[tracks[0]])
                .header("content-type", "application/json")
                .body(body);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            request
        }
    };
    let response = request
        .send()
        .await
        .map_err(|e| format!("publishing: {}", causes(&e)))?;
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "publishing: HTTP {}: {}",
            status.as_u16(),
            String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
        ))
    }
}

/// Publish: runs every publisher to the end of its share (or the deadline).
pub(super) async fn publish_all(
    plan: &Plan,
    shared: &Arc<Shared>,
    client: &reqwest::Client,
    args: &Arc<BenchArgs>,
    deadline: TokioInstant,
) -> Vec<Published> {
    let began = TokioInstant::now();
    let handles: Vec<_> = plan
        .publishers
        .iter()
        .map(|spec| {
            tokio::spawn(publish(
                spec.clone(),
                shared.clone(),
                client.clone(),
                args.clone(),
                began,
                deadline,
            ))
        })
        .collect();
    let mut published = Vec::with_capacity(handles.len());
    for handle in handles {
        published.push(handle.await.unwrap_or_default());
    }
    published
}
