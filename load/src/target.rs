//! The nodes under load: their URLs (loopback only unless `--allow-remote`),
//! the HTTP calls the tool makes (`/readyz`, the service API, dev tokens) and
//! the users' tokens (signed here, or asked of the server).

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use reqwest::{Method, header};
use serde_json::{Value, json};

use crate::{Fatal, fatal};

/// One HTTP request (connect, send, answer) may take this long.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// One node.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://host:port`
    pub base: String,
    /// `ws://host:port/ws/chat`
    pub ws: String,
}

/// A node from `--url`: `http://host:port` (or `ws://`), plain HTTP, loopback
/// unless `allow_remote`.
pub fn parse(url: &str, allow_remote: bool) -> Result<Target, Fatal> {
    let url = url.trim().trim_end_matches('/');
    if url.starts_with("https://") || url.starts_with("wss://") {
        return Err(fatal(format!("{url}: TLS is not supported; point --url at a node's plain HTTP port")));
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| fatal(format!("{url}: expected http://host:port")))?;
    let authority = rest.split('/').next().unwrap_or_default().to_string();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(|| fatal(format!("{url}: bad IPv6 address")))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("80"))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.clone(), "80"),
        }
    };
    let port: u16 = port.parse().map_err(|_| fatal(format!("{url}: bad port")))?;
    let loopback = host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback && !allow_remote {
        return Err(fatal(format!(
            "{url}: '{host}' is not a loopback address; pass --allow-remote to load a remote server \
             (only ever one you run yourself)"
        )));
    }
    let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    Ok(Target { base: format!("http://{authority}"), ws: format!("ws://{authority}/ws/chat") })
}

// ---------------------------------------------------------------- HTTP

/// HTTP/1.1 to the nodes, kept-alive connections shared by the whole run
/// (plain HTTP only, no proxy).
#[derive(Clone)]
pub struct Http(reqwest::Client);

impl Http {
    pub fn new() -> Result<Http, Fatal> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .timeout(HTTP_TIMEOUT)
            .build()
            .map_err(|e| fatal(format!("HTTP client: {}", describe(&e))))?;
        Ok(Http(client))
    }

    /// One request: the status and the body (JSON, or the text as a JSON
    /// string). Tried twice, as a kept-alive connection may have been closed
    /// by the server meanwhile.
    pub async fn request(
        &self,
        method: Method,
        target: &Target,
        path: &str,
        bearer: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", target.base);
        let mut last = String::new();
        for _ in 0..2 {
            let mut req = self.0.request(method.clone(), &url).header(header::ACCEPT, "application/json");
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            match exchange(req).await {
                Ok(r) => return Ok(r),
                Err(e) => last = describe(&e),
            }
        }
        Err(format!("{method} {url}: {last}"))
    }
}

async fn exchange(req: reqwest::RequestBuilder) -> Result<(u16, Value), reqwest::Error> {
    let r = req.send().await?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// An HTTP error by its root cause (`Connection refused (os error 111)`,
/// `connection closed before message completed`, ...), `timeout` for a timeout.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timeout".into();
    }
    let mut root: &dyn std::error::Error = e;
    while let Some(cause) = root.source() {
        root = cause;
    }
    root.to_string()
}

/// What `/readyz` says of each node (engine, node id), or why it could not be asked.
pub async fn readyz(http: &Http, targets: &[Target]) -> Vec<Value> {
    let mut out = Vec::new();
    for t in targets {
        let v = match http.request(Method::GET, t, "/readyz", None, None).await {
            Ok((status, v)) => json!({"url": t.base, "status": status, "engine": v["engine"], "node": v["node"]}),
            Err(e) => json!({"url": t.base, "error": e}),
        };
        out.push(v);
    }
    out
}

/// Creates or replaces the group `id` with these members (service API).
pub async fn put_group(
    http: &Http,
    target: &Target,
    api_key: &str,
    id: &str,
    title: &str,
    members: &[String],
) -> Result<(), Fatal> {
    let path = format!("/api/v1/conversations/{id}");
    let body = json!({"title": title, "members": members});
    let (status, v) = http.request(Method::PUT, target, &path, Some(api_key), Some(&body)).await?;
    if status != 200 {
        return Err(fatal(format!("PUT {path}: {status} {v}")));
    }
    Ok(())
}

// ---------------------------------------------------------------- tokens

/// Where user tokens come from.
#[derive(Clone)]
pub enum TokenSource {
    /// HS256, signed here with `--jwt-secret`.
    Sign(jsonwebtoken::EncodingKey),
    /// `POST /api/v1/dev/token` on this node.
    Dev(Target),
}

/// Tokens for `users` (in order), valid `lifetime_s`: signed here, or from
/// `POST /api/v1/dev/token` with a few requests in flight.
pub async fn tokens(src: &TokenSource, http: &Http, users: &[String], lifetime_s: u64) -> Result<Vec<String>, Fatal> {
    match src {
        TokenSource::Sign(key) => {
            let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + lifetime_s;
            let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            users
                .iter()
                .map(|u| {
                    jsonwebtoken::encode(&header, &json!({"sub": u, "name": u, "exp": exp}), key)
                        .map_err(|e| fatal(format!("signing a token: {e}")))
                })
                .collect()
        }
        TokenSource::Dev(target) => {
            let users = Arc::new(users.to_vec());
            let next = Arc::new(AtomicUsize::new(0));
            let out = Arc::new(Mutex::new(vec![String::new(); users.len()]));
            let mut workers = Vec::new();
            for _ in 0..users.len().clamp(1, 8) {
                let (users, next, out, target, http) =
                    (users.clone(), next.clone(), out.clone(), target.clone(), http.clone());
                workers.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(u) = users.get(i) else { return Ok::<(), String>(()) };
                        let body = json!({"user": u, "name": u});
                        let (status, v) =
                            http.request(Method::POST, &target, "/api/v1/dev/token", None, Some(&body)).await?;
                        match v["token"].as_str() {
                            Some(t) if status == 200 => out.lock().unwrap()[i] = t.to_string(),
                            _ => {
                                return Err(format!(
                                    "POST /api/v1/dev/token answered {status} {v} (dev tokens off? use --jwt-secret)"
                                ));
                            }
                        }
                    }
                }));
            }
            for w in workers {
                w.await?.map_err(Fatal)?;
            }
            let out = std::mem::take(&mut *out.lock().unwrap());
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_loopback_plain_http() {
        let t = parse("http://127.0.0.1:18000/", false).ok().unwrap();
        assert_eq!((t.base.as_str(), t.ws.as_str()), ("http://127.0.0.1:18000", "ws://127.0.0.1:18000/ws/chat"));
        let t = parse("ws://[::1]:9", false).ok().unwrap();
        assert_eq!(t.base, "http://[::1]:9");
        assert_eq!(parse("http://localhost", false).ok().unwrap().base, "http://localhost:80");
        assert!(parse("https://127.0.0.1:1", false).is_err());
        assert!(parse("http://192.0.2.1:8000", false).is_err());
        assert!(parse("http://192.0.2.1:8000", true).is_ok());
        assert!(parse("http://127.0.0.1:x", false).is_err());
    }
}
