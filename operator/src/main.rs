//! `liveresponse-operator`: reconciles sessions and commands and serves the agent gateway.
//! Only the replica holding the Lease works; the others wait to take over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use liveresponse_api::crd::{
    BatchCommand, Command, Device, LibraryFile, LiveResponseSession, LiveResponseSettings,
};
use liveresponse_api::proto::agent_gateway_server::AgentGatewayServer;
use liveresponse_operator::artifacts::{ArtifactStore, S3Config};
use liveresponse_operator::context::{Context, Stores, Timing, Who};
use liveresponse_operator::controllers::{self, batch, command, device, library, session};
use liveresponse_operator::files_api;
use liveresponse_operator::gateway::{Gateway, GatewayService};
use liveresponse_operator::metrics::Metrics;
use liveresponse_operator::pki::{Ca, Rotation};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Live response operator: controllers and agent gateway"
)]
struct Args {
    /// Namespace of the operator itself: its CA Secret and leader Lease live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "liveresponse-system")]
    namespace: String,
    /// Address of the agent gateway (gRPC over TLS).
    #[arg(long, default_value = "127.0.0.1:8443")]
    gateway_addr: SocketAddr,
    /// Names and IP addresses agents use to reach the gateway (its certificate's SANs).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
    gateway_names: Vec<String>,
    /// Address of /metrics and /healthz.
    #[arg(long, default_value = "127.0.0.1:9090")]
    metrics_addr: SocketAddr,
    /// Name of this replica (the Lease holder identity and Device.status.gateway).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Seconds between agent heartbeats; an agent silent for three is disconnected.
    #[arg(long, default_value_t = 5)]
    heartbeat_seconds: u64,
    /// Also write the CA certificate here, for agents to pin (the Secret holds it too).
    #[arg(long)]
    ca_out: Option<std::path::PathBuf>,
    /// Concurrent reconciles per controller. Reconciles mostly wait on the API server, so
    /// many run well on few cores (make bench: fan-out and throughput scale with it).
    #[arg(long, default_value_t = 32)]
    concurrency: u16,
    /// Seconds a running command survives its device's disconnection: an agent that is
    /// back within them delivers its result.
    #[arg(long, default_value_t = 30)]
    disconnect_grace_seconds: u64,
    /// After a start, seconds agents get to reconnect before their running commands fail.
    #[arg(long, default_value_t = 20)]
    restart_grace_seconds: u64,
    /// Life of the device certificates the gateway signs; agents renew them over their
    /// stream at two thirds of it (default 30 days).
    #[arg(long, default_value_t = liveresponse_operator::pki::DEFAULT_DEVICE_LIFETIME.as_secs(), value_parser = clap::value_parser!(u64).range(30..))]
    device_certificate_lifetime_seconds: u64,
    /// Directory of the artifact store (getfile results, full outputs, library uploads),
    /// and of the staging files transfers are written to first. A PersistentVolume in a
    /// cluster: an interrupted getfile resumes from what is staged there.
    #[arg(
        long,
        env = "LR_ARTIFACT_DIR",
        default_value = "/var/lib/liveresponse/artifacts"
    )]
    artifact_dir: std::path::PathBuf,
    /// Keep artifacts in this S3 bucket instead of --artifact-dir (which still holds the
    /// staging files). Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = "LR_ARTIFACT_S3_BUCKET")]
    artifact_s3_bucket: Option<String>,
    /// Endpoint of an S3-compatible store (`http://127.0.0.1:9000`); unset for AWS.
    #[arg(long, env = "LR_ARTIFACT_S3_ENDPOINT", default_value = "")]
    artifact_s3_endpoint: String,
    #[arg(long, env = "LR_ARTIFACT_S3_REGION", default_value = "us-east-1")]
    artifact_s3_region: String,
    /// Serve the file API (downloads and library uploads through the Kubernetes API
    /// server) here. Must be an address the API server reaches: a pod IP, never loopback.
    #[arg(long, env = "LR_FILES_ADDR")]
    files_addr: Option<SocketAddr>,
    /// The Service the API server reaches the file API through, `NAMESPACE/NAME:PORT`: the
    /// operator registers the APIService v1alpha1.files.liveresponse.io for it, with its
    /// CA, and names the Service in its serving certificate.
    #[arg(
        long,
        env = "LR_FILES_SERVICE",
        default_value = "liveresponse-system/liveresponse-files:443"
    )]
    files_service: String,
    /// Seconds between sweeps of the artifact store for artifacts nothing names any more.
    #[arg(long, default_value_t = 600)]
    artifact_gc_interval_seconds: u64,
    /// How old an unnamed artifact (or an idle staging file) must be before it is deleted:
    /// an upload waits this long for the LibraryFile that names it.
    #[arg(long, default_value_t = 3600)]
    artifact_gc_grace_seconds: u64,
    #[command(subcommand)]
    admin: Option<Admin>,
}

/// `NAMESPACE/NAME:PORT`.
fn service_ref(s: &str) -> anyhow::Result<(String, String, i32)> {
    let (ns, rest) = s
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("--files-service {s:?}: write NAMESPACE/NAME:PORT"))?;
    let (name, port) = rest.split_once(':').unwrap_or((rest, "443"));
    let port: i32 = port
        .parse()
        .map_err(|_| anyhow::anyhow!("--files-service {s:?}: the port is not a number"))?;
    Ok((ns.to_string(), name.to_string(), port))
}

#[derive(clap::Subcommand, Debug)]
enum Admin {
    /// One step of a CA rotation (prepare, switch, finish), applied to the CA Secret in
    /// --namespace with the current kubeconfig; restart the operator after each step.
    Ca {
        #[arg(value_enum)]
        step: Rotation,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,tower=warn,hyper=warn".into()),
        )
        .with_current_span(false)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if let Some(Admin::Ca { step }) = args.admin {
        let said =
            async { Ca::rotate_secret(Client::try_default().await?, &args.namespace, step).await }
                .await;
        match said {
            Ok(said) => println!("{said}"),
            Err(e) => {
                eprintln!("liveresponse-operator ca: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if let Err(e) = run(args).await {
        tracing::error!(error = %format!("{e:#}"), "operator stopped");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let instance = args
        .instance
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let metrics = Metrics::new();
    let artifacts = Arc::new(match &args.artifact_s3_bucket {
        Some(bucket) => ArtifactStore::s3(
            &S3Config {
                endpoint: args.artifact_s3_endpoint.clone(),
                bucket: bucket.clone(),
                region: args.artifact_s3_region.clone(),
                access_key_id: std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
                secret_access_key: std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
            },
            &args.artifact_dir.join("staging"),
        )?,
        None => ArtifactStore::local(&args.artifact_dir)?,
    });
    tracing::info!(backend = artifacts.backend(), dir = %args.artifact_dir.display(), "artifact store");
    tokio::spawn({
        let metrics = metrics.clone();
        async move {
            if let Err(e) = liveresponse_operator::metrics::serve(args.metrics_addr, metrics).await
            {
                tracing::error!(error = %e, "metrics server stopped");
                std::process::exit(1);
            }
        }
    });

    // Two replicas must never reconcile at once: wait for the Lease, and stop if it is lost.
    let lease =
        kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "liveresponse-operator")
            .with_namespace(&args.namespace)
            .with_identity(&instance)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await?;
    let (mut leader, lease_task) = lease.watch().await;
    tracing::info!(%instance, "waiting for the leader lease");
    while !*leader.borrow_and_update() {
        leader.changed().await?;
    }
    tracing::info!(%instance, "leading");
    tokio::spawn(async move {
        loop {
            if leader.changed().await.is_err() || !*leader.borrow() {
                tracing::error!("lost the leader lease; exiting so another replica takes over");
                std::process::exit(1);
            }
        }
    });
    tokio::spawn(async move {
        let r = lease_task.await;
        tracing::error!(result = ?r.map(|r| r.map(|_| ())), "lease task ended; exiting");
        std::process::exit(1);
    });

    let ca = Arc::new(Ca::load_or_create(client.clone(), &args.namespace).await?);
    if let Some(path) = &args.ca_out {
        std::fs::write(path, &ca.bundle_pem)?;
    }
    let serving = ca.serving_cert(&args.gateway_names)?;
    let gateway = Gateway::new(
        client.clone(),
        ca.clone(),
        instance.clone(),
        Duration::from_secs(args.heartbeat_seconds.max(1)),
        metrics.clone(),
        Duration::from_secs(args.device_certificate_lifetime_seconds),
    );
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&serving.cert_pem, &serving.key_pem))
        .client_ca_root(Certificate::from_pem(&ca.bundle_pem))
        // Enrollment happens before the agent has a certificate; Attach demands one.
        .client_auth_optional(true);
    let listener = tokio::net::TcpListener::bind(args.gateway_addr).await?;
    tracing::info!(addr = %args.gateway_addr, "agent gateway listening");
    let svc = AgentGatewayServer::new(GatewayService(gateway.clone()))
        .max_decoding_message_size(liveresponse_operator::gateway::MAX_AGENT_MESSAGE);
    tokio::spawn(async move {
        // The socket options go on the incoming stream: tonic ignores its builder's
        // `tcp_nodelay` and `tcp_keepalive` with `serve_with_incoming`. Without NODELAY,
        // Nagle holds the gateway's small HTTP/2 window updates until the agent's delayed
        // ACK (tens of ms), and a getfile crawls at about one flow-control window per ACK.
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(20)));
        // Keepalives find a dead peer whose TCP connection did not say so.
        let r = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tls_config(tls)
            .map(|mut s| s.add_service(svc).serve_with_incoming(incoming));
        match r {
            Ok(fut) => {
                if let Err(e) = fut.await {
                    tracing::error!(error = %e, "gateway stopped");
                }
            }
            Err(e) => tracing::error!(error = %e, "gateway TLS configuration is invalid"),
        }
        std::process::exit(1);
    });

    let cfg = watcher::Config::default().any_semantic();
    let ctrl_cfg = kube::runtime::controller::Config::default().concurrency(args.concurrency);
    let sessions_api = Api::<LiveResponseSession>::all(client.clone());
    let commands_api = Api::<Command>::all(client.clone());
    let session_ctrl =
        Controller::new(sessions_api.clone(), cfg.clone()).with_config(ctrl_cfg.clone());
    let library_ctrl = Controller::new(Api::<LibraryFile>::all(client.clone()), cfg.clone())
        .with_config(ctrl_cfg.clone());
    let command_ctrl = Controller::new(commands_api, cfg.clone()).with_config(ctrl_cfg);
    let session_store = session_ctrl.store();
    let command_store = command_ctrl.store();
    let (device_store, device_writer) = reflector::store::<Device>();
    let (settings_store, settings_writer) = reflector::store::<LiveResponseSettings>();
    tokio::spawn(liveresponse_operator::controllers::device::watch(
        gateway.clone(),
        device_writer,
        client.clone(),
    ));
    // Bootstrap tokens, looked up at each enrollment: a cache of the labelled Secrets only.
    let (token_store, token_writer) = reflector::store::<k8s_openapi::api::core::v1::Secret>();
    gateway.set_token_store(token_store);
    let tokens_api = Api::<k8s_openapi::api::core::v1::Secret>::all(client.clone());
    tokio::spawn(
        reflector::reflector(
            token_writer,
            watcher(
                tokens_api,
                watcher::Config::default().labels(&format!(
                    "{}=true",
                    liveresponse_operator::gateway::BOOTSTRAP_LABEL
                )),
            ),
        )
        .default_backoff()
        .for_each(|_| async {}),
    );
    gateway.set_settings_store(settings_store.clone());
    gateway.set_artifacts(artifacts.clone());
    let settings_api = Api::<LiveResponseSettings>::all(client.clone());
    tokio::spawn(
        reflector::reflector(settings_writer, watcher(settings_api, cfg.clone()))
            .default_backoff()
            .for_each(|_| async {}),
    );
    // Who the API server says we are: a batch's child sessions are opened in this name.
    let identity = whoami(&client).await?;
    tracing::info!(%identity, "authenticated to the API server");
    let ctx = Arc::new(Context::new(
        client.clone(),
        gateway.clone(),
        metrics,
        Who {
            instance: instance.clone(),
            identity,
        },
        Stores {
            commands: command_store.clone(),
            sessions: session_store,
            devices: device_store.clone(),
            settings: settings_store.clone(),
        },
        Timing {
            restart_grace: Duration::from_secs(args.restart_grace_seconds),
            disconnect_grace: Duration::from_secs(args.disconnect_grace_seconds),
        },
        artifacts,
    ));
    // Decisions read these caches: start once they hold the cluster's state.
    device_store.wait_until_ready().await?;
    settings_store.wait_until_ready().await?;
    tokio::spawn(device::run(ctx.clone()));
    tokio::spawn(controllers::artifact_gc::run(
        ctx.clone(),
        Duration::from_secs(args.artifact_gc_interval_seconds.max(1)),
        Duration::from_secs(args.artifact_gc_grace_seconds),
    ));
    if let Some(addr) = args.files_addr {
        let (svc_ns, svc_name, svc_port) = service_ref(&args.files_service)?;
        let proxy = files_api::front_proxy(client.clone()).await?;
        let names = vec![
            format!("{svc_name}.{svc_ns}.svc"),
            format!("{svc_name}.{svc_ns}.svc.cluster.local"),
            addr.ip().to_string(),
        ];
        let cert = ca.serving_cert(&names)?;
        let tls = files_api::tls_config(&cert.cert_pem, &cert.key_pem, &proxy)?;
        files_api::register(client.clone(), &svc_ns, &svc_name, svc_port, &ca.bundle_pem).await?;
        let api = Arc::new(files_api::FilesApi {
            client: client.clone(),
            artifacts: ctx.artifacts.clone(),
            settings: settings_store.clone(),
            proxy,
        });
        tokio::spawn(async move {
            if let Err(e) = files_api::serve(addr, tls, api).await {
                tracing::error!(error = %e, "the file API stopped");
                std::process::exit(1);
            }
        });
    }

    // A session's change (Connected, ended) concerns its commands.
    let by_session = command_store.clone();
    let command_ctrl = command_ctrl
        .watches(sessions_api, cfg.clone(), move |s: LiveResponseSession| {
            liveresponse_operator::context::commands_of(
                &by_session,
                &s.namespace().unwrap_or_default(),
                &s.name_any(),
            )
            .into_iter()
            .map(|c| ObjectRef::from_obj(c.as_ref()))
            .collect::<Vec<_>>()
        })
        .reconcile_on(gateway.command_wakes.stream())
        .shutdown_on_signal()
        .run(
            command::reconcile,
            controllers::error_policy("command"),
            ctx.clone(),
        )
        .for_each(|_| async {});
    let session_ctrl = session_ctrl
        .reconcile_on(ctx.session_wakes.stream())
        .shutdown_on_signal()
        .run(
            session::reconcile,
            controllers::error_policy("session"),
            ctx.clone(),
        )
        .for_each(|_| async {});
    // A library file is checked again when its ConfigMap or Secret changes (their metadata
    // is enough to know that, so no Secret value is held here) or its namespace's settings
    // (trusted signers, size limit) do.
    let library_store = library_ctrl.store();
    let (by_cm, by_secret, by_settings) =
        (library_store.clone(), library_store.clone(), library_store);
    let library_ctrl = library_ctrl
        .watches(
            Api::<PartialObjectMeta<k8s_openapi::api::core::v1::ConfigMap>>::all(client.clone()),
            cfg.clone(),
            move |cm: PartialObjectMeta<k8s_openapi::api::core::v1::ConfigMap>| {
                library::referencing(
                    &by_cm,
                    &cm.namespace().unwrap_or_default(),
                    &cm.name_any(),
                    false,
                )
            },
        )
        .watches(
            Api::<PartialObjectMeta<k8s_openapi::api::core::v1::Secret>>::all(client.clone()),
            cfg.clone(),
            move |s: PartialObjectMeta<k8s_openapi::api::core::v1::Secret>| {
                library::referencing(
                    &by_secret,
                    &s.namespace().unwrap_or_default(),
                    &s.name_any(),
                    true,
                )
            },
        )
        .watches(
            Api::<LiveResponseSettings>::all(client.clone()),
            cfg.clone(),
            move |s: LiveResponseSettings| {
                library::in_namespace(&by_settings, &s.namespace().unwrap_or_default())
            },
        )
        .shutdown_on_signal()
        .run(
            library::reconcile,
            controllers::error_policy("library"),
            ctx.clone(),
        )
        .for_each(|_| async {});
    // A batch follows its children: their changes (labelled with the batch's name) wake it.
    let batches_api = Api::<BatchCommand>::all(client.clone());
    let batch_ctrl = Controller::new(batches_api, cfg.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(args.concurrency))
        .watches(
            Api::<Command>::all(client.clone()),
            watcher::Config::default().labels(liveresponse_api::crd::BATCH_LABEL),
            |c: Command| batch::parent(&c.metadata),
        )
        .watches(
            Api::<LiveResponseSession>::all(client.clone()),
            watcher::Config::default().labels(liveresponse_api::crd::BATCH_LABEL),
            |s: LiveResponseSession| batch::parent(&s.metadata),
        )
        .shutdown_on_signal()
        .run(
            batch::reconcile,
            controllers::error_policy("batch"),
            ctx.clone(),
        )
        .for_each(|_| async {});
    tokio::join!(command_ctrl, session_ctrl, library_ctrl, batch_ctrl);
    tracing::info!("controllers stopped");
    Ok(())
}

async fn whoami(client: &Client) -> anyhow::Result<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&Default::default(), &SelfSubjectReview::default())
        .await?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| anyhow::anyhow!("the API server did not say who this operator is (SelfSubjectReview without a user name)"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "operator".into())
}
