//! Prometheus metrics, served on `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Sessions by phase (from the session controller's view of the cluster).
    pub sessions: IntGaugeVec,
    /// Commands that reached a final phase, by verb and result.
    pub commands: IntCounterVec,
    /// Seconds from a Command's creation to its final phase, by verb.
    pub command_latency: HistogramVec,
    /// Agents with an open stream to this replica.
    pub agents_connected: IntGauge,
    /// Streams refused because the device already had a live one (a copied certificate).
    pub duplicate_connections: prometheus::IntCounter,
    /// Reconcile errors by controller.
    pub reconcile_errors: IntCounterVec,
    /// Bytes of files received from agents (getfile).
    pub file_bytes: prometheus::IntCounter,
    /// Batches that finished, by phase.
    pub batches: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let sessions = IntGaugeVec::new(
            Opts::new("liveresponse_sessions", "Live response sessions by phase"),
            &["phase"],
        )
        .expect("static metric definition");
        let commands = IntCounterVec::new(
            Opts::new(
                "liveresponse_commands_total",
                "Commands that finished, by verb and result",
            ),
            &["verb", "result"],
        )
        .expect("static metric definition");
        let command_latency = HistogramVec::new(
            HistogramOpts::new(
                "liveresponse_command_duration_seconds",
                "Seconds from Command creation to its final phase",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
            ]),
            &["verb"],
        )
        .expect("static metric definition");
        let agents_connected = IntGauge::new(
            "liveresponse_agents_connected",
            "Agents with an open stream to this operator replica",
        )
        .expect("static metric definition");
        let duplicate_connections = prometheus::IntCounter::new(
            "liveresponse_duplicate_connections_total",
            "Agent streams refused because their device already had a live one",
        )
        .expect("static metric definition");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "liveresponse_reconcile_errors_total",
                "Reconcile errors by controller",
            ),
            &["controller"],
        )
        .expect("static metric definition");
        let file_bytes = prometheus::IntCounter::new(
            "liveresponse_file_bytes_received_total",
            "Bytes of files received from agents (getfile)",
        )
        .expect("static metric definition");
        let batches = IntCounterVec::new(
            Opts::new(
                "liveresponse_batches_total",
                "BatchCommands that finished, by phase",
            ),
            &["phase"],
        )
        .expect("static metric definition");
        for c in [
            Box::new(batches.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(sessions.clone()),
            Box::new(commands.clone()),
            Box::new(command_latency.clone()),
            Box::new(agents_connected.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(duplicate_connections.clone()),
            Box::new(file_bytes.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // A counter that never fired is still exported as 0, so a dashboard or an alert
        // on it sees "no errors" rather than "no data".
        for controller in ["command", "session", "device", "batch"] {
            reconcile_errors.with_label_values(&[controller]);
        }
        Self {
            registry,
            sessions,
            commands,
            command_latency,
            agents_connected,
            duplicate_connections,
            reconcile_errors,
            file_bytes,
            batches,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/metrics` and `/healthz` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode, service::service_fn};
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    loop {
        let (stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.render()),
                        "/healthz" | "/readyz" => (StatusCode::OK, "ok".to_string()),
                        _ => (StatusCode::NOT_FOUND, "not found".to_string()),
                    };
                    Response::builder()
                        .status(status)
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
