//! `soak`: the soak of the real agent binary under load and faults (testkit/src/soak.rs says
//! what it does), from the command line. `--help` lists the options; the agent binary is
//! `druid-log-agent` beside this one unless `--agent` says otherwise.

use std::process::ExitCode;

use clap::Parser;
use druid_log_agent_testkit::soak::{Args, run};

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(summary) => {
            println!("{summary:#}");
            if summary["ok"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::from(2)
        }
    }
}
