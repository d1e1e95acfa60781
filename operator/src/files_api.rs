//! The file API: an aggregated API (`files.liveresponse.io/v1alpha1`) that the Kubernetes
//! API server proxies to the operator, so every download and upload is authenticated,
//! authorised by RBAC and audited by the API server with the user's own credentials.
//!
//! - `GET .../namespaces/NS/commands/NAME/file`: a getfile's content (HTTP ranges, so an
//!   interrupted download resumes), RBAC `get` on `commands/file`.
//! - `POST .../namespaces/NS/libraryfiles/NAME/content`: uploads content for a library file
//!   (at most maxLibraryFileSize); answers its sha256, which the LibraryFile then names.
//!   RBAC `create` on `libraryfiles/content`.
//!
//! Only the API server may call it: the client certificate must be its front proxy's
//! (the `requestheader` CA and names the API server publishes in
//! `kube-system/extension-apiserver-authentication`), and only then are the
//! `X-Remote-User`/`X-Remote-Group` headers believed.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use liveresponse_api::crd::{Command, LiveResponseSettings, parse_size};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::artifacts::ArtifactStore;

pub const GROUP: &str = "files.liveresponse.io";
pub const VERSION: &str = "v1alpha1";

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// What the API server says about the front proxy it calls aggregated APIs through.
#[derive(Clone, Debug, Default)]
pub struct FrontProxy {
    pub ca_pem: String,
    pub allowed_names: Vec<String>,
    pub user_headers: Vec<String>,
    pub group_headers: Vec<String>,
}

/// Reads the front proxy's CA and header names from the API server's published config.
pub async fn front_proxy(client: kube::Client) -> anyhow::Result<FrontProxy> {
    let cm = Api::<ConfigMap>::namespaced(client, "kube-system")
        .get("extension-apiserver-authentication")
        .await?;
    let data = cm.data.unwrap_or_default();
    let list = |k: &str| -> Vec<String> {
        data.get(k)
            .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
            .unwrap_or_default()
    };
    let ca_pem = data
        .get("requestheader-client-ca-file")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the API server publishes no requestheader-client-ca-file: start it with --requestheader-client-ca-file to serve the file API"))?;
    Ok(FrontProxy {
        ca_pem,
        allowed_names: list("requestheader-allowed-names"),
        user_headers: list("requestheader-username-headers"),
        group_headers: list("requestheader-group-headers"),
    })
}

/// TLS that requires the front proxy's client certificate.
pub fn tls_config(
    cert_pem: &str,
    key_pem: &str,
    proxy: &FrontProxy,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(proxy.ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A request the file API serves.
/// What of a command is downloaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// `commands/NAME/file`: the file a getfile brought back.
    File,
    /// `commands/NAME/output`: the whole output, when it did not fit in the status.
    Output,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/apis/files.liveresponse.io/v1alpha1`: what the API server's discovery asks.
    Resources,
    /// `/apis/files.liveresponse.io`.
    Group,
    CommandFile {
        namespace: String,
        name: String,
        what: Served,
    },
    LibraryContent {
        namespace: String,
        name: String,
    },
    Health,
}

/// Where a request goes, or the status and message it is refused with.
pub fn route(method: &Method, path: &str) -> Result<Route, (StatusCode, String)> {
    let base = format!("/apis/{GROUP}/{VERSION}");
    if path == "/healthz" || path == "/readyz" {
        return Ok(Route::Health);
    }
    if path == format!("/apis/{GROUP}") || path == format!("/apis/{GROUP}/") {
        return Ok(Route::Group);
    }
    if path == base || path == format!("{base}/") {
        return Ok(Route::Resources);
    }
    let rest = path
        .strip_prefix(&format!("{base}/namespaces/"))
        .ok_or((StatusCode::NOT_FOUND, format!("{path} is not served here")))?;
    let parts: Vec<&str> = rest.split('/').collect();
    // A DNS subdomain, as object names are: never `.` or `..`.
    let ok_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    match parts.as_slice() {
        [ns, "commands", name, sub @ ("file" | "output")] if ok_name(ns) && ok_name(name) => {
            if method != Method::GET && method != Method::HEAD {
                return Err((
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("commands/{sub} is read with GET"),
                ));
            }
            Ok(Route::CommandFile {
                namespace: ns.to_string(),
                name: name.to_string(),
                what: if *sub == "file" {
                    Served::File
                } else {
                    Served::Output
                },
            })
        }
        [ns, "libraryfiles", name, "content"] if ok_name(ns) && ok_name(name) => {
            if method != Method::POST && method != Method::PUT {
                return Err((
                    StatusCode::METHOD_NOT_ALLOWED,
                    "libraryfiles/content is written with POST".into(),
                ));
            }
            Ok(Route::LibraryContent {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        _ => Err((StatusCode::NOT_FOUND, format!("{path} is not served here"))),
    }
}

/// A `Range` header that cannot be served (HTTP 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A `Range` header against a file of `size` bytes: `None` for the whole file, `Err` when
/// it cannot be satisfied. One range only: what resuming a download needs.
pub fn parse_range(header: &str, size: u64) -> Result<Option<Range<u64>>, Unsatisfiable> {
    let num = |s: &str| s.parse::<u64>().map_err(|_| Unsatisfiable);
    let spec = header.trim().strip_prefix("bytes=").ok_or(Unsatisfiable)?;
    if spec.contains(',') {
        return Err(Unsatisfiable);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => (size.saturating_sub(num(n)?), size),
        (s, "") => (num(s)?, size),
        (s, e) => (num(s)?, num(e)?.saturating_add(1).min(size)),
    };
    if start >= end || start >= size {
        return Err(Unsatisfiable);
    }
    Ok(Some(start..end))
}

/// The Kubernetes Status kubectl shows for a refusal.
fn status(code: StatusCode, message: &str) -> Response<Body> {
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::UNAUTHORIZED => "Unauthorized",
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::PAYLOAD_TOO_LARGE => "RequestEntityTooLarge",
        StatusCode::RANGE_NOT_SATISFIABLE => "BadRequest",
        StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
        StatusCode::CONFLICT => "Conflict",
        _ => "InternalError",
    };
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    json(code, &body)
}

fn json(code: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = code;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("static"));
    r
}

fn full(s: String) -> Body {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn discovery() -> serde_json::Value {
    serde_json::json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [
            {"name": "commands", "singularName": "command", "namespaced": true, "kind": "Command", "verbs": []},
            {"name": "commands/file", "singularName": "", "namespaced": true, "kind": "Command", "verbs": ["get"]},
            {"name": "commands/output", "singularName": "", "namespaced": true, "kind": "Command", "verbs": ["get"]},
            {"name": "libraryfiles", "singularName": "libraryfile", "namespaced": true, "kind": "LibraryFile", "verbs": []},
            {"name": "libraryfiles/content", "singularName": "", "namespaced": true, "kind": "LibraryFile", "verbs": ["create"]},
        ]
    })
}

pub struct FilesApi {
    pub client: kube::Client,
    pub artifacts: Arc<ArtifactStore>,
    pub settings: Store<LiveResponseSettings>,
    pub proxy: FrontProxy,
}

impl FilesApi {
    /// The user the API server authenticated, from the front proxy's headers.
    fn user(&self, req: &Request<Incoming>) -> Option<String> {
        let names: Vec<String> = if self.proxy.user_headers.is_empty() {
            vec!["X-Remote-User".into()]
        } else {
            self.proxy.user_headers.clone()
        };
        names.iter().find_map(|h| {
            req.headers()
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let r = match route(req.method(), req.uri().path()) {
            Ok(r) => r,
            Err((code, msg)) => return status(code, &msg),
        };
        let user = self.user(&req);
        match r {
            Route::Health => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            Route::Group => json(
                StatusCode::OK,
                &serde_json::json!({
                    "kind": "APIGroup", "apiVersion": "v1", "name": GROUP,
                    "versions": [{"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION}],
                    "preferredVersion": {"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION},
                }),
            ),
            Route::Resources => json(StatusCode::OK, &discovery()),
            Route::CommandFile {
                namespace,
                name,
                what,
            } => {
                let range = req
                    .headers()
                    .get("range")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let head = req.method() == Method::HEAD;
                self.download(&namespace, &name, what, range.as_deref(), head, user)
                    .await
            }
            Route::LibraryContent { namespace, name } => {
                self.upload(&namespace, &name, req, user).await
            }
        }
    }

    async fn download(
        &self,
        ns: &str,
        name: &str,
        what: Served,
        range: Option<&str>,
        head: bool,
        user: Option<String>,
    ) -> Response<Body> {
        let command = match Api::<Command>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
        {
            Ok(Some(c)) => c,
            Ok(None) => {
                return status(
                    StatusCode::NOT_FOUND,
                    &format!("command {name} not found in namespace {ns}"),
                );
            }
            Err(e) => return status(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        };
        let st = command.status.unwrap_or_default();
        // What is served: its artifact, size, digest and a file name for it.
        let file = match what {
            Served::File => {
                let Some(file) = st.file else {
                    return status(
                        StatusCode::NOT_FOUND,
                        &format!(
                            "command {name} moved no file (only a getfile that succeeded has one)"
                        ),
                    );
                };
                file
            }
            Served::Output => {
                let Some(out) = st.output.filter(|o| o.artifact.is_some()) else {
                    return status(
                        StatusCode::NOT_FOUND,
                        &format!(
                            "command {name} has no output kept beyond its status: its whole output is status.output.content"
                        ),
                    );
                };
                let ext = match out.format {
                    liveresponse_api::crd::OutputFormat::Json => "json",
                    liveresponse_api::crd::OutputFormat::Table => "txt",
                };
                liveresponse_api::crd::FileRef {
                    path: format!("{name}.{ext}"),
                    size: out.size,
                    sha256: out.sha256.unwrap_or_default(),
                    artifact: out.artifact,
                }
            }
        };
        let Some(sha) = file.artifact.clone() else {
            return status(
                StatusCode::NOT_FOUND,
                &format!("command {name}'s file is not in the artifact store"),
            );
        };
        let size = u64::try_from(file.size).unwrap_or(0);
        let wanted = match range.map(|r| parse_range(r, size)) {
            None => None,
            Some(Ok(r)) => r,
            Some(Err(Unsatisfiable)) => {
                return status(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    &format!("the range {range:?} does not fit the file's {size} bytes"),
                );
            }
        };
        let reading = if head {
            None
        } else {
            match self.artifacts.get(&sha, wanted.clone()).await {
                Ok(Some(r)) => Some(r),
                Ok(None) => {
                    return status(
                        StatusCode::NOT_FOUND,
                        &format!("command {name}'s file is no longer in the artifact store"),
                    );
                }
                Err(e) => return status(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        };
        let served = wanted.clone().unwrap_or(0..size);
        tracing::info!(namespace = %ns, command = %name, user = user.as_deref().unwrap_or("?"), from = served.start, to = served.end, "serving a file");
        let body: Body = match reading {
            Some(r) => BodyExt::boxed_unsync(StreamBody::new(
                r.body
                    .map_ok(Frame::data)
                    .map_err(|e| std::io::Error::other(e.to_string())),
            )),
            None => full(String::new()),
        };
        let mut resp = Response::new(body);
        let h = resp.headers_mut();
        let set = |h: &mut hyper::HeaderMap, k: &'static str, v: String| {
            if let Ok(v) = v.parse() {
                h.insert(k, v);
            }
        };
        set(h, "content-type", "application/octet-stream".into());
        set(h, "accept-ranges", "bytes".into());
        set(h, "content-length", (served.end - served.start).to_string());
        set(h, "x-content-sha256", file.sha256.clone());
        let base = file.path.rsplit(['/', '\\']).next().unwrap_or("file");
        let safe: String = base
            .chars()
            .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
            .collect();
        set(
            h,
            "content-disposition",
            format!("attachment; filename=\"{safe}\""),
        );
        if wanted.is_some() {
            set(
                h,
                "content-range",
                format!(
                    "bytes {}-{}/{size}",
                    served.start,
                    served.end.saturating_sub(1)
                ),
            );
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
        resp
    }

    async fn upload(
        &self,
        ns: &str,
        name: &str,
        req: Request<Incoming>,
        user: Option<String>,
    ) -> Response<Body> {
        let limit = self
            .settings
            .get(&ObjectRef::new("default").within(ns))
            .and_then(|s| parse_size(&s.spec.max_library_file_size))
            .unwrap_or(250 << 20);
        let expected = req
            .headers()
            .get("x-content-sha256")
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        if let Some(len) = req
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && len > limit
        {
            return status(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "the file is {len} bytes, more than this namespace's maxLibraryFileSize ({limit} bytes)"
                ),
            );
        }
        let body = http_body_util::BodyStream::new(req.into_body())
            .filter_map(|f| async move {
                match f {
                    Ok(frame) => frame.into_data().ok().map(Ok),
                    Err(e) => Some(Err(e)),
                }
            })
            .boxed();
        match self
            .artifacts
            .put_stream(body, limit, expected.as_deref())
            .await
        {
            Ok((sha256, size)) => {
                tracing::info!(namespace = %ns, libraryfile = %name, user = user.as_deref().unwrap_or("?"), %sha256, size, "library content uploaded");
                json(
                    StatusCode::CREATED,
                    &serde_json::json!({ "sha256": sha256, "size": size }),
                )
            }
            Err(crate::artifacts::StoreError::TooLarge { limit }) => status(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "the file is more than this namespace's maxLibraryFileSize ({limit} bytes)"
                ),
            ),
            Err(e @ crate::artifacts::StoreError::DigestMismatch { .. }) => {
                status(StatusCode::BAD_REQUEST, &e.to_string())
            }
            Err(e) => status(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }
}

/// Serves the file API over TLS; only connections with the front proxy's certificate
/// (and, when the API server names them, one of its allowed names) get an answer.
pub async fn serve(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    api: Arc<FilesApi>,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tracing::info!(%addr, "serving the file API");
    loop {
        let (stream, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let api = api.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "file API: TLS refused");
                    return;
                }
            };
            let allowed = &api.proxy.allowed_names;
            if !allowed.is_empty() {
                let cn = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| common_name(c.as_ref()));
                if !cn.as_ref().is_some_and(|cn| allowed.contains(cn)) {
                    tracing::warn!(%peer, ?cn, "file API: a client certificate that is not the front proxy's");
                    return;
                }
            }
            let svc = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// Registers the APIService that sends the group to `service` (namespace/name), trusting
/// `ca_pem` for the operator's serving certificate. Idempotent: run at every start.
pub async fn register(
    client: kube::Client,
    service_ns: &str,
    service_name: &str,
    port: i32,
    ca_pem: &str,
) -> anyhow::Result<()> {
    use k8s_openapi::ByteString;
    use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::{
        APIService, APIServiceSpec, ServiceReference,
    };
    use kube::api::{Patch, PatchParams};
    let name = format!("{VERSION}.{GROUP}");
    let svc = APIService {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_string(),
                    "liveresponse".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(APIServiceSpec {
            group: Some(GROUP.into()),
            version: Some(VERSION.into()),
            group_priority_minimum: 1000,
            version_priority: 15,
            ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
            service: Some(ServiceReference {
                namespace: Some(service_ns.into()),
                name: Some(service_name.into()),
                port: Some(port),
            }),
            insecure_skip_tls_verify: None,
        }),
        status: None,
    };
    Api::<APIService>::all(client)
        .patch(
            &name,
            &PatchParams::apply(crate::context::MANAGER).force(),
            &Patch::Apply(&svc),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let get = Method::GET;
        assert_eq!(
            route(
                &get,
                "/apis/files.liveresponse.io/v1alpha1/namespaces/ns/commands/pull/file"
            ),
            Ok(Route::CommandFile {
                namespace: "ns".into(),
                name: "pull".into(),
                what: Served::File,
            })
        );
        assert_eq!(
            route(
                &get,
                "/apis/files.liveresponse.io/v1alpha1/namespaces/ns/commands/ps/output"
            ),
            Ok(Route::CommandFile {
                namespace: "ns".into(),
                name: "ps".into(),
                what: Served::Output,
            })
        );
        assert_eq!(
            route(
                &Method::POST,
                "/apis/files.liveresponse.io/v1alpha1/namespaces/ns/libraryfiles/x.sh/content"
            ),
            Ok(Route::LibraryContent {
                namespace: "ns".into(),
                name: "x.sh".into()
            })
        );
        assert_eq!(
            route(&get, "/apis/files.liveresponse.io/v1alpha1"),
            Ok(Route::Resources)
        );
        for bad in [
            "/apis/files.liveresponse.io/v1alpha1/namespaces/ns/commands/../file",
            "/apis/files.liveresponse.io/v1alpha1/namespaces/NS/commands/a/file",
            "/apis/files.liveresponse.io/v1alpha1/namespaces/ns/commands/a/file/extra",
            "/api/v1/secrets",
        ] {
            assert_eq!(
                route(&get, bad).map_err(|e| e.0),
                Err(StatusCode::NOT_FOUND),
                "{bad}"
            );
        }
        assert_eq!(
            route(
                &Method::DELETE,
                "/apis/files.liveresponse.io/v1alpha1/namespaces/ns/commands/a/file"
            )
            .map_err(|e| e.0),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Ok(Some(0..10)));
        assert_eq!(parse_range("bytes=4-", 10), Ok(Some(4..10)));
        assert_eq!(parse_range("bytes=2-5", 10), Ok(Some(2..6)));
        assert_eq!(parse_range("bytes=2-500", 10), Ok(Some(2..10)));
        assert_eq!(parse_range("bytes=-3", 10), Ok(Some(7..10)));
        assert_eq!(parse_range("bytes=10-", 10), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=5-2", 10), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=0-1,4-5", 10), Err(Unsatisfiable));
        assert_eq!(parse_range("items=0-1", 10), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=x-", 10), Err(Unsatisfiable));
    }
}
