//! The Prometheus endpoint: `GET /metrics` answers the `prometheus` crate's
//! default registry in the text exposition format; anything else is 404.
//!
//! Metrics themselves are registered by the crates that count them (the
//! agent's and the metadata server's `metrics` modules) with the crate's
//! atomic counters, gauges and histograms, so counting on the data path
//! takes no lock; only a scrape walks the registry.
//!
//! The server is deliberately minimal (HTTP/1.1, one request type, no TLS):
//! bind it to loopback or a management network, like node_exporter.

use std::net::SocketAddr;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::Encoder;

/// Connections a scrape endpoint serves at once; more wait in the backlog.
pub const SCRAPE_CONNECTIONS_MAX: usize = 16;

/// Binds `addr` and serves `/metrics` on the current tokio runtime until
/// the runtime ends. Returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr} (--metrics-addr)"))?;
    let local = listener.local_addr()?;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(SCRAPE_CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    continue;
                }
            };
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let service =
                    hyper::service::service_fn(|req| async move { Ok::<_, std::convert::Infallible>(answer(&req)) });
                if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                    tracing::debug!("metrics endpoint: connection ended: {e}");
                }
                drop(permit);
            });
        }
    });
    tracing::info!(addr = %local, "serving Prometheus metrics on /metrics");
    Ok(local)
}

fn answer<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", b"only GET /metrics is served here\n".to_vec());
    }
    let encoder = prometheus::TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&prometheus::gather(), &mut body) {
        Ok(()) => reply(StatusCode::OK, encoder.format_type(), body),
        Err(e) => {
            reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("encoding metrics: {e}\n").into_bytes())
        }
    }
}

/// Registers `metric` in the default registry and returns it. Call it
/// once per metric (the declaring modules do, from a `LazyLock`); a
/// refused registration (a name declared twice: a bug) is logged and the
/// metric then counts without being exported.
pub fn register<M>(metric: M) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    if let Err(e) = prometheus::register(Box::new(metric.clone())) {
        tracing::error!("metric not exported: {e}");
    }
    metric
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_the_default_registry_on_metrics_and_nothing_else() {
        let counter = super::register(prometheus::IntCounter::new("ops_test_total", "a test counter").unwrap());
        counter.inc_by(7);
        let addr = super::serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let page = get(addr, "/metrics").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("# TYPE ops_test_total counter") && page.contains("ops_test_total 7"), "{page}");
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
    }
}
