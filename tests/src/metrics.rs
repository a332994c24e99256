//! Scraping a process's Prometheus endpoint in a test: the address it
//! printed, `GET /metrics`, parsed with a Prometheus text parser (not our
//! own), and the value of one sample.

use std::io::{Read, Write};
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

use crate::system::Proc;

/// The address a process printed as `metrics http://ADDR/metrics`.
pub fn metrics_addr(proc: &Proc) -> String {
    let log = proc.log();
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("metrics http://"))
        .unwrap_or_else(|| panic!("{} printed no metrics address:\n{log}", proc.name));
    line.trim_end_matches("/metrics").to_string()
}

/// `GET /metrics` from `addr`, parsed as the Prometheus text format.
pub fn scrape(addr: &str) -> Scrape {
    let mut stream = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the HTTP response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "scrape of {addr}: {head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("the Prometheus text parser accepts the scrape")
}

/// The value of `metric` with exactly these labels (among others).
pub fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => panic!("{metric} is a summary"),
        })
        .next()
}

pub fn must(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    value(scrape, metric, labels).unwrap_or_else(|| {
        let names: std::collections::BTreeSet<_> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
        panic!("no {metric}{labels:?} in the scrape; it has {names:?}")
    })
}
