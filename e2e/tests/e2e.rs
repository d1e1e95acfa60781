//! End-to-end tests against a real kube-apiserver + etcd + kube-controller-manager started by
//! `e2e/cluster.sh`, with the real operator and agents as processes (`e2e::stack`). The
//! control plane and operator come up once before the tests and go down after them.
//! `LR_E2E_KEEP=1` leaves them running for a look afterwards.
//!
//! Tests run in two rounds: first those that share the operator peacefully, in parallel;
//! then, one at a time, those that restart it.

mod agent_protocol;
mod analyze;
mod api;
mod batch;
mod certificates;
mod console;
mod control_plane;
mod defence;
mod enrollment;
mod files;
mod fleet;
mod hostile;
mod library;
mod live;
mod pipeline;
mod respond;
mod scripts;

use std::path::PathBuf;

use e2e::Cluster;
use e2e::stack::Stack;
use libtest_mimic::{Arguments, Failed, Trial};

/// What every test gets: the control plane, the running stack, and a runtime.
pub struct Env {
    pub cluster: Cluster,
    pub stack: Stack,
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

fn fail(what: &str, e: anyhow::Error) -> ! {
    eprintln!("e2e: {what}: {e:#}");
    std::process::exit(1);
}

fn main() {
    let args = Arguments::from_args();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let state = std::env::var_os("LR_E2E_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| e2e::repo_root().join("e2e/.state/test-cluster"));
    let cluster = Cluster::up(&state).unwrap_or_else(|e| fail("cannot start the control plane", e));
    let stack = Stack::up(cluster.clone()).unwrap_or_else(|e| {
        let _ = cluster.down();
        fail("cannot start the operator", e)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail("cannot start a tokio runtime", e.into()));
    let env: &'static Env = Box::leak(Box::new(Env { cluster, stack, rt }));

    let parallel = trials![
        env,
        control_plane::rbac_is_enforced,
        control_plane::service_account_tokens_are_reviewed,
        control_plane::crd_status_and_watch,
        control_plane::owner_deletion_collects_dependents,
        control_plane::cluster_script_is_idempotent,
        control_plane::missing_go_is_explained,
        api::api_is_installed_and_documented,
        batch::batch_runs_on_the_devices_its_selector_picks,
        batch::cancelling_a_batch_stops_every_child,
        api::basic_analyst_tier,
        api::advanced_analyst_tier,
        api::outsider_can_create_nothing,
        api::sessions_belong_to_their_requester,
        api::library_and_settings_admins,
        api::invalid_objects_are_explained,
        live::basic_commands_match_ground_truth,
        live::session_limits_and_lifecycle,
        live::cancel_and_timeout,
        live::agent_crash_and_return,
        live::agent_identity_is_enforced,
        live::metrics_match_activity,
        live::processes_latency,
        live::commands_belong_to_the_session_requester,
        console::interactive_console,
        console::exec_for_scripts,
        agent_protocol::oversized_agent_strings_are_bounded,
        agent_protocol::a_copied_certificate_is_refused_and_cannot_rename_the_device,
        defence::metadata_of_others_objects_is_refused,
        enrollment::bootstrap_tokens_expire_run_out_and_name_their_devices,
        console::hostile_text_is_shown_escaped,
        pipeline::brief_disconnect_keeps_running_commands,
        pipeline::offline_device_commands_wait_and_run_in_order,
        pipeline::offline_queue_timeout_ends_commands_and_session,
        pipeline::cd_then_dir_always_sees_the_new_folder,
        pipeline::finished_commands_expire_after_retention,
        hostile::fileinfo_refuses_what_is_not_a_file,
        hostile::persistence_survives_a_hostile_home,
        hostile::cancel_ends_a_busy_command_within_5s,
        hostile::symlinks_never_leave_the_host_root,
        certificates::agents_renew_short_lived_certificates,
        certificates::deleting_a_device_cuts_its_stream,
        files::getfile_resumes_after_the_agent_dies,
        files::getfile_refuses_what_it_cannot_copy,
        library::inline_script_is_ready_with_its_digest,
        library::config_map_edits_are_followed_and_pins_enforced,
        library::signatures_are_checked_against_trusted_signers,
        library::oversized_content_is_invalid,
        library::upload_through_the_file_api,
        scripts::run_checks_signatures_and_passes_parameters_literally,
        scripts::cancel_stops_the_scripts_process_tree,
        scripts::putfile_overwrites_only_when_asked_and_keeps_only_when_asked,
        respond::a_quarantined_file_comes_back_exactly,
        respond::a_process_tree_is_stopped_and_its_executable_quarantined,
        respond::an_account_is_locked_and_restored_by_a_responder,
        respond::persistence_entries_are_removed_and_restored,
        respond::a_collected_package_matches_its_manifest,
        respond::isolation_keeps_only_the_gateway,
        analyze::analyze_gives_verdicts_from_the_library_rules,
        analyze::scan_finds_planted_files_within_bounds_and_cancels,
        fleet::simulated_agents_answer_from_their_fixture,
    ];
    let serial = trials![
        env,
        live::second_replica_waits_for_the_lease,
        live::operator_restart_loses_nothing,
        defence::advanced_verbs_fail_closed_without_the_tier_binding,
        // Alone: it kills the operator right after a dispatch.
        respond::a_remediation_sent_twice_acts_once,
        // Alone: it restarts the operator with the S3 backend, and back.
        files::getfile_with_the_s3_backend,
        // Alone: a stopped agent must not slow the others, and B's latency is only
        // comparable before/during without other tests' load.
        pipeline::stalled_agent_does_not_stall_other_tenants,
        // Alone: it measures the operator's memory, which other tests' commands would move.
        pipeline::large_outputs_are_summarized_in_bounded_memory,
        // Last: it replaces the CA that every agent enrolled before it trusts.
        certificates::the_ca_rotates_without_losing_an_agent,
    ];
    let first = libtest_mimic::run(&args, parallel);
    let mut serial_args = args.clone();
    serial_args.test_threads = Some(1);
    let second = libtest_mimic::run(&serial_args, serial);

    if std::env::var_os("LR_E2E_KEEP").is_none() {
        let _ = env.stack.down();
        if let Err(e) = env.cluster.down() {
            eprintln!("e2e: stopping the control plane failed: {e:#}");
        }
    } else {
        eprintln!(
            "e2e: control plane left running in {}",
            env.cluster.state.display()
        );
    }
    let passed = first.num_passed + second.num_passed;
    let failed = first.num_failed + second.num_failed;
    println!("e2e: {passed} passed, {failed} failed");
    std::process::exit(if failed > 0 { 101 } else { 0 });
}
