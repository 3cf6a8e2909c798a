//! `servicegate`: run the gateway, check a config, replay captures, talk to a running
//! gateway. See ../shared/interface.md for the promises these commands make.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use control::config::Config;

#[derive(Parser)]
#[command(
    name = "servicegate",
    about = "DPDK service gateway for Kubernetes",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start EAL, ports, workers and the control thread; run until SIGINT/SIGTERM.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate the config (and the manifests of the files source); print what it serves.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the real pipeline over pcap files: every port becomes a net_pcap port.
    Replay {
        #[arg(long)]
        config: PathBuf,
        /// PORT=FILE.pcap: frames entering on the port named PORT.
        #[arg(long = "in", value_name = "PORT=IN.pcap", required = true)]
        inputs: Vec<String>,
        /// Where PORT.pcap files of transmitted frames are written.
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Talk to a running gateway's admin API.
    Ctl {
        /// Admin API address.
        #[arg(
            long,
            default_value = "127.0.0.1:9900",
            env = "SERVICEGATE_ADMIN",
            global = true
        )]
        admin: String,
        /// Print the raw JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        what: CtlWhat,
    },
    /// Version, DPDK version, git revision.
    Version,
}

#[derive(Subcommand)]
enum CtlWhat {
    /// Every served frontend with its backends.
    Services,
    /// Connection tracking entries.
    Conntrack {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only flows of this service (namespace/name).
        #[arg(long)]
        service: Option<String>,
    },
    /// Explain what the gateway does with a flow: `tcp 10.0.0.5:41000 -> 10.96.0.10:80`.
    Trace {
        #[arg(num_args = 1.., required = true)]
        flow: Vec<String>,
    },
    /// The prefixes this gateway asks its BGP speaker to announce, and why.
    Announcements,
    /// Capture a port's packets into a pcapng file (the gateway must run on hugepages).
    Capture {
        /// The port's name in the config (`uplink`, `cluster`, `uplink-exception`).
        #[arg(long)]
        port: String,
        /// Only this rx/tx queue (default: every queue).
        #[arg(long)]
        queue: Option<u16>,
        #[arg(long, value_enum, default_value_t = control::capture::Direction::Both)]
        direction: control::capture::Direction,
        /// libpcap filter syntax, e.g. `tcp port 80` (run in the gateway as eBPF).
        #[arg(long)]
        filter: Option<String>,
        /// Stop after this many frames.
        #[arg(long, short = 'c', default_value_t = 0)]
        count: u64,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
        /// Bytes kept of each frame.
        #[arg(long, default_value_t = 2176)]
        snaplen: u32,
        /// The pcapng file to write.
        #[arg(short = 'w', long = "write")]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => {
            load_to_serve(&config).and_then(|c| control::app::run(c, &config))
        }
        Command::Check { config } => load_to_serve(&config).and_then(|c| control::app::check(&c)),
        Command::Replay {
            config,
            inputs,
            out_dir,
        } => load(&config).and_then(|c| control::app::replay(c, &inputs, &out_dir)),
        Command::Ctl { admin, json, what } => ctl(admin, json, what),
        Command::Version => {
            println!("servicegate {}", env!("CARGO_PKG_VERSION"));
            println!("{}", dataplane::dpdk::version());
            println!("git {}", env!("SERVICEGATE_GIT_REVISION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("servicegate: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `servicegate ctl`: a capture runs here (a DPDK secondary process); everything else is
/// one admin API request.
fn ctl(admin: String, json: bool, what: CtlWhat) -> anyhow::Result<()> {
    let command = match what {
        CtlWhat::Services => control::ctl::CtlCommand::Services,
        CtlWhat::Conntrack { limit, service } => control::ctl::CtlCommand::Conntrack {
            limit: Some(limit),
            service,
        },
        CtlWhat::Trace { flow } => control::ctl::CtlCommand::Trace {
            flow: flow.join(" "),
        },
        CtlWhat::Announcements => control::ctl::CtlCommand::Announcements,
        CtlWhat::Capture {
            port,
            queue,
            direction,
            filter,
            count,
            duration,
            snaplen,
            output,
        } => {
            return control::capture::run(&control::capture::CaptureRequest {
                admin,
                port,
                queue,
                direction,
                filter,
                count,
                duration: duration.map(std::time::Duration::from_secs_f64),
                snaplen,
                output,
            })
        }
    };
    control::ctl::run(&admin, command, json)
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

/// [`load`], then the service source must be readable: `run` fails before EAL starts
/// instead of never becoming ready, and `check` fails the same way. (`replay` reads the
/// manifests itself and never the Kubernetes API.)
fn load_to_serve(path: &std::path::Path) -> anyhow::Result<Config> {
    let config = load(path)?;
    config.check_service_source(path)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command, CtlWhat};

    fn ctl(args: &[&str]) -> (String, bool, CtlWhat) {
        let cli = Cli::try_parse_from(args).expect("parses");
        match cli.command {
            Command::Ctl { admin, json, what } => (admin, json, what),
            _ => panic!("not ctl: {args:?}"),
        }
    }

    #[test]
    fn ctl_admin_and_json_go_before_or_after_the_subcommand() {
        for args in [
            &[
                "servicegate",
                "ctl",
                "services",
                "--admin",
                "10.0.0.1:9900",
                "--json",
            ][..],
            &[
                "servicegate",
                "ctl",
                "--admin",
                "10.0.0.1:9900",
                "--json",
                "services",
            ][..],
            &[
                "servicegate",
                "ctl",
                "--json",
                "services",
                "--admin=10.0.0.1:9900",
            ][..],
        ] {
            let (admin, json, what) = ctl(args);
            assert_eq!(admin, "10.0.0.1:9900", "{args:?}");
            assert!(json, "{args:?}");
            assert!(matches!(what, CtlWhat::Services), "{args:?}");
        }
        let (admin, _, what) = ctl(&[
            "servicegate",
            "ctl",
            "conntrack",
            "--limit",
            "5",
            "--admin",
            "[::1]:9900",
        ]);
        assert_eq!(admin, "[::1]:9900");
        assert!(matches!(what, CtlWhat::Conntrack { limit: 5, .. }));
    }

    #[test]
    fn ctl_admin_defaults_to_loopback() {
        // The environment variable would override the default.
        if std::env::var_os("SERVICEGATE_ADMIN").is_none() {
            let (admin, json, _) = ctl(&["servicegate", "ctl", "services"]);
            assert_eq!(admin, "127.0.0.1:9900");
            assert!(!json);
        }
    }
}
