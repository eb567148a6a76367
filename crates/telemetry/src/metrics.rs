//! Prometheus exposition shared by the binaries: the text encoding, the bucket layouts, and small helpers for
//! series read at scrape time.
//!
//! Each binary owns a [`Registry`] of its series; `/metrics` answers [`encode`] of it. Series that live in atomics
//! elsewhere (engine occupancy, placement epoch) are written at scrape time by a [`Collector`] through
//! [`Scrape`], so there is one source of truth and no copying on the hot path.

use std::borrow::Cow;

pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`encode`]'s output: Prometheus text format 0.0.4, which every scraper reads.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// vLLM's bucket bounds for time to first token, in seconds, so that its dashboards' quantiles read the same.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
/// vLLM's bucket bounds for the time between two tokens of a sequence, in seconds.
pub const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// vLLM's bucket bounds for whole-request phases (end to end, queue, prefill, decode), in seconds.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];
/// Bucket bounds for one message's round trip between a router and an expert node, or one batch's compute on a
/// node, in seconds: 50 µs to 10 s.
pub const DISPATCH_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A histogram over `bounds`.
pub fn histogram(bounds: &[f64]) -> Histogram {
    Histogram::new(bounds.iter().copied())
}

/// vLLM's bounds for token counts: 1, 2, 5, 10, 20, 50, … up to `max` (the context length).
pub fn token_buckets(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1u64;
    'outer: loop {
        for m in [1, 2, 5] {
            let v = m * scale;
            if v > max.max(1) as u64 {
                break 'outer;
            }
            out.push(v as f64);
        }
        scale *= 10;
    }
    out
}

/// A registry whose every series carries `model_name`, as vLLM's do.
pub fn registry_for_model(model_name: &str) -> Registry {
    Registry::with_labels(std::iter::once((Cow::Borrowed("model_name"), Cow::Owned(model_name.to_owned()))))
}

/// The registry in Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a collector, and the scrape then gets
    // what was written before it.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::error!("encoding metrics: {e}");
    }
    out
}

/// Writes series read at scrape time. Names are given without the `_total` that counters get.
pub struct Scrape<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl std::fmt::Debug for Scrape<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Fmt = Result<(), std::fmt::Error>;

impl<'a> Scrape<'a> {
    pub fn new(encoder: DescriptorEncoder<'a>) -> Self {
        Scrape { encoder }
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> Fmt {
        let c = ConstCounter::new(value);
        c.encode(self.encoder.encode_descriptor(name, help, None, c.metric_type())?)
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: i64) -> Fmt {
        let g = ConstGauge::new(value);
        g.encode(self.encoder.encode_descriptor(name, help, None, g.metric_type())?)
    }

    pub fn gauge_f64(&mut self, name: &str, help: &str, value: f64) -> Fmt {
        let g = ConstGauge::new(value);
        g.encode(self.encoder.encode_descriptor(name, help, None, g.metric_type())?)
    }

    /// A gauge with one series per label set.
    pub fn gauges<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, f64)>,
    ) -> Fmt {
        let mut family =
            self.encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
        for (labels, value) in series {
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A counter with one series per label set (`u64` or `f64` values).
    pub fn counters<L: EncodeLabelSet, V: EncodeCounterValue + Copy>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, V)>,
    ) -> Fmt {
        let mut family =
            self.encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
        for (labels, value) in series {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A [`Collector`] made of a closure over [`Scrape`].
pub struct ScrapeWith<F>(pub F);

impl<F> std::fmt::Debug for ScrapeWith<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScrapeWith")
    }
}

impl<F> Collector for ScrapeWith<F>
where
    F: Fn(&mut Scrape<'_>) -> Fmt + Send + Sync + 'static,
{
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Fmt {
        (self.0)(&mut Scrape::new(encoder))
    }
}

/// One series of an exposition: its name, its labels in order (values as written), its value.
pub type Series = (String, Vec<(String, String)>, f64);

/// The series of an exposition, one per line, in order, for tests and checks of golden lists. Comment lines are
/// skipped.
pub fn parse_series(text: &str) -> Vec<Series> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (head, value) = match line.rfind(' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => continue,
        };
        let value = value.parse::<f64>().unwrap_or(f64::NAN);
        let (name, labels) = match head.find('{') {
            Some(i) => (&head[..i], head[i + 1..].trim_end_matches('}')),
            None => (head, ""),
        };
        let mut pairs = Vec::new();
        let mut rest = labels;
        while let Some(eq) = rest.find("=\"") {
            let key = rest[..eq].trim_start_matches(',').to_owned();
            let after = &rest[eq + 2..];
            let mut end = 0;
            let bytes = after.as_bytes();
            while end < bytes.len() && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\')) {
                end += 1;
            }
            pairs.push((key, after[..end].to_owned()));
            rest = after.get(end + 1..).unwrap_or("");
        }
        out.push((name.to_owned(), pairs, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn vllm_names_keep_their_colon_and_every_series_its_model_name() {
        let mut registry = registry_for_model("demo");
        let c: Counter = Counter::default();
        c.inc_by(3);
        registry.register("vllm:prompt_tokens", "Prompt tokens", c);
        let h = histogram(TTFT_BUCKETS);
        h.observe(0.03);
        registry.register("vllm:time_to_first_token_seconds", "TTFT", h);
        registry.register_collector(Box::new(ScrapeWith(|s: &mut Scrape<'_>| {
            s.gauge("vllm:num_requests_running", "Running", 2)?;
            s.gauges("moe_layer_load_imbalance", "Imbalance", [(vec![("layer", "3")], 1.5)])
        })));
        let text = encode(&registry);
        let series = parse_series(&text);
        let find = |name: &str| series.iter().find(|(n, _, _)| n == name).cloned();
        let (_, labels, v) = find("vllm:prompt_tokens_total").expect("counter");
        assert_eq!(labels, vec![("model_name".to_owned(), "demo".to_owned())]);
        assert_eq!(v, 3.0);
        assert_eq!(find("vllm:time_to_first_token_seconds_count").expect("histogram").2, 1.0);
        let (_, labels, v) = find("vllm:num_requests_running").expect("collected gauge");
        assert!(labels.contains(&("model_name".to_owned(), "demo".to_owned())), "{labels:?}");
        assert_eq!(v, 2.0);
        let (_, labels, _) = find("moe_layer_load_imbalance").expect("labelled gauge");
        assert!(labels.contains(&("layer".to_owned(), "3".to_owned())), "{labels:?}");
        assert!(text.contains("# TYPE vllm:time_to_first_token_seconds histogram"), "{text}");
    }

    #[test]
    fn token_buckets_follow_vllms_one_two_five() {
        assert_eq!(token_buckets(100), vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
        assert_eq!(token_buckets(4), vec![1.0, 2.0]);
    }
}
