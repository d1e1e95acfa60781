//! `liveresponse-agent`: the endpoint agent. Its connection loop and providers arrive with
//! the core issue; this binary is the seam.

fn main() {
    eprintln!(
        "liveresponse-agent {}: the agent is not built yet (see the open issues)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
