//! `kubectl-liveresponse`: the analyst's console. It arrives with the console issue; this
//! binary is the seam.

fn main() {
    eprintln!(
        "kubectl-liveresponse {}: the console is not built yet (see the open issues)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
