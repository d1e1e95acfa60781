//! End-to-end tests against a real kube-apiserver + etcd + kube-controller-manager started by
//! `e2e/cluster.sh`. The control plane comes up once before the tests and goes down after
//! them. `LR_E2E_KEEP=1` leaves it running for a look afterwards.

mod api;
mod control_plane;

use std::path::PathBuf;

use e2e::Cluster;
use libtest_mimic::{Arguments, Failed, Trial};

/// What every test gets: the control plane and a runtime to drive async clients.
pub struct Env {
    pub cluster: Cluster,
    pub rt: tokio::runtime::Runtime,
}

/// Registers `async fn(&'static Env) -> anyhow::Result<()>` tests as trials.
macro_rules! trials {
    ($env:expr, $($path:path),* $(,)?) => {
        vec![$({
            let env: &'static Env = $env;
            Trial::test(stringify!($path).replace(' ', ""), move || {
                env.rt.block_on($path(env)).map_err(|e| Failed::from(format!("{e:#}")))
            })
        }),*]
    };
}

fn main() {
    let args = Arguments::from_args();
    let state = std::env::var_os("LR_E2E_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| e2e::repo_root().join("e2e/.state/test-cluster"));
    let cluster = match Cluster::up(&state) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("e2e: cannot start the control plane: {e:#}");
            std::process::exit(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("e2e: cannot start a tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let env: &'static Env = Box::leak(Box::new(Env { cluster, rt }));

    let tests = trials![
        env,
        control_plane::rbac_is_enforced,
        control_plane::service_account_tokens_are_reviewed,
        control_plane::crd_status_and_watch,
        control_plane::owner_deletion_collects_dependents,
        control_plane::cluster_script_is_idempotent,
        control_plane::missing_go_is_explained,
        api::api_is_installed_and_documented,
        api::basic_analyst_tier,
        api::advanced_analyst_tier,
        api::outsider_can_create_nothing,
        api::sessions_belong_to_their_requester,
        api::library_and_settings_admins,
        api::invalid_objects_are_explained,
    ];
    let conclusion = libtest_mimic::run(&args, tests);
    if std::env::var_os("LR_E2E_KEEP").is_none() {
        if let Err(e) = env.cluster.down() {
            eprintln!("e2e: stopping the control plane failed: {e:#}");
        }
    } else {
        eprintln!(
            "e2e: control plane left running in {}",
            env.cluster.state.display()
        );
    }
    conclusion.exit();
}
