//! Prometheus metrics at `/metrics`: request counts and latencies by verb, group, resource and
//! code, named as kube-apiserver names them.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: String,
    group: String,
    resource: String,
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    verb: String,
    group: String,
    resource: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            // 0.1 ms to ~26 s.
            Histogram::new(exponential_buckets(0.0001, 2.0, 19))
        });
        registry.register("apiserver_request", "Requests by verb, group, resource and HTTP code", requests.clone());
        registry.register(
            "apiserver_request_duration_seconds",
            "Time to the response headers by verb, group and resource (watches: to the start of the stream)",
            latency.clone(),
        );
        Metrics { registry: Mutex::new(registry), requests, latency }
    }
}

impl Metrics {
    pub fn record(&self, verb: &str, group: &str, resource: &str, code: u16, elapsed: Duration) {
        let labels = RequestLabels {
            verb: verb.to_string(),
            group: group.to_string(),
            resource: resource.to_string(),
            code: code.to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        let labels = LatencyLabels { verb: verb.to_string(), group: group.to_string(), resource: resource.to_string() };
        self.latency.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_verb_and_resource() {
        let metrics = Metrics::default();
        metrics.record("create", "", "configmaps", 201, Duration::from_millis(2));
        metrics.record("create", "", "configmaps", 201, Duration::from_millis(3));
        metrics.record("get", "apps", "deployments", 404, Duration::from_millis(1));
        let text = metrics.render();
        assert!(
            text.contains(r#"apiserver_request_total{verb="create",group="",resource="configmaps",code="201"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"apiserver_request_duration_seconds_count{verb="get",group="apps",resource="deployments"} 1"#
            ),
            "{text}"
        );
    }
}
