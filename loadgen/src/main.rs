//! ringlog-loadgen: the bundled benchmark. Its workloads, latency histograms (hdrhistogram) and
//! reports arrive with the loadgen issue; until then this binary only says so.

fn main() -> std::process::ExitCode {
    eprintln!("ringlog-loadgen: not implemented yet (tracked by the loadgen issue)");
    std::process::ExitCode::from(2)
}
