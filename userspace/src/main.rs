//! The `tern` command: `run` the terminator, `check-config` a file, `ctl` a running tern,
//! `ticket-keys` to make and rotate a `[tls] ticket_keys` file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tern::config::Config;
use tern::supervise::EXIT_CONFIG;

#[derive(Parser)]
#[command(name = "tern", version, about = "A Linux-native TLS terminator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run tern with a configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Take over from the tern running on the configuration's control socket: take its
        /// listening sockets, start, then tell it to drain (a zero-downtime binary upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a configuration file (certificates and keys are read too) and exit.
    CheckConfig { file: PathBuf },
    /// Talk to a running tern over its control socket.
    Ctl {
        #[arg(long, short, default_value = "/run/tern.sock")]
        socket: PathBuf,
        /// Output format. Default: what each command always printed (JSON for stats, backends
        /// and conns; plain lines for the others). `text`: aligned tables; `json`: one JSON
        /// document for every command. Errors are `error: ...` (exit 1) in every format.
        #[arg(long, global = true, value_enum)]
        format: Option<tern::control::text::Format>,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Make and rotate a `[tls] ticket_keys` file (docs/operations.md: rotating across a fleet).
    TicketKeys {
        #[command(subcommand)]
        command: TicketKeysCommand,
    },
}

#[derive(Subcommand)]
enum TicketKeysCommand {
    /// Print a new key line (base64 of 80 random bytes).
    New,
    /// Add a new key in second place: every host learns to decrypt it before any encrypts.
    Stage { file: PathBuf },
    /// Make the second key the first (it encrypts from now on); keep KEEP keys after it.
    Promote {
        file: PathBuf,
        #[arg(long, default_value_t = tern::tls::ticket_keys::DEFAULT_KEEP)]
        keep: usize,
    },
    /// Put a new key first and keep KEEP keys after it (stage and promote at once, for a
    /// single host); creates FILE when missing. The file is replaced atomically.
    Rotate {
        file: PathBuf,
        #[arg(long, default_value_t = tern::tls::ticket_keys::DEFAULT_KEEP)]
        keep: usize,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Print every worker's counters and the totals, latency percentiles and the backend
    /// servers (JSON by default; `--format text`: tables).
    Stats,
    /// Check that tern answers.
    Ping,
    /// Re-read the configuration file (as SIGHUP does): new connections get the new
    /// certificates, backends, TLS settings, timeouts and limits; open ones keep theirs. A
    /// file that does not validate, or a change that needs a restart, is refused (exit 1) and
    /// the running configuration stays.
    Reload,
    /// Print each backend server's state (up, down, retired) and counters (JSON by default;
    /// `--format text`: one line per server).
    Backends,
    /// Print the open connections counted per state (handshake, waiting, connecting,
    /// proxying, half_closed, closing) per worker, per path and in total (JSON by default;
    /// `--format text`: a table).
    Conns,
    /// Drop every packet from PREFIX on every interface tern's XDP program is attached to.
    Block {
        /// An IPv4 or IPv6 prefix (10.0.0.0/8, 2001:db8::/32) or a single address.
        prefix: String,
    },
    /// Remove PREFIX (exactly as it was blocked) from the blocklist.
    Unblock {
        /// The prefix as listed by `tern ctl blocks`.
        prefix: String,
    },
    /// List the blocked prefixes, one per line.
    Blocks,
    /// Drain as on SIGTERM: stop accepting, finish open connections, exit 0.
    Drain,
    /// Make the access log writer open its file anew (after logrotate moved it).
    ReopenLog,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            log_level,
            upgrade,
        } => {
            init_logging(&log_level);
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tern: invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            // 1: start-up failed (what had started was released); 70: a thread failed after
            // start-up (a panic exits 70 from the panic hook directly). See docs/operations.md.
            let run = if upgrade {
                tern::server::upgrade
            } else {
                tern::server::run
            };
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tern: {e:#}");
                    ExitCode::from(tern::supervise::exit_code(&e))
                }
            }
        }
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener(s), {} certificate(s), {} backend server(s), {} worker(s))",
                    file.display(),
                    c.listeners.len(),
                    c.certificates.len(),
                    c.backend.servers.len(),
                    c.workers.count
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tern: invalid configuration: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::TicketKeys { command } => ticket_keys(command),
        Command::Ctl {
            socket,
            format,
            command,
        } => {
            let cmd = match command {
                CtlCommand::Stats => "stats".to_string(),
                CtlCommand::Ping => "ping".to_string(),
                CtlCommand::Reload => "reload".to_string(),
                CtlCommand::Backends => "backends".to_string(),
                CtlCommand::Conns => "conns".to_string(),
                CtlCommand::Block { prefix } => format!("block {prefix}"),
                CtlCommand::Unblock { prefix } => format!("unblock {prefix}"),
                CtlCommand::Blocks => "blocks".to_string(),
                CtlCommand::Drain => "drain".to_string(),
                CtlCommand::ReopenLog => "reopen-log".to_string(),
            };
            match tern::control::request(&socket, &cmd) {
                Ok(reply) => {
                    let name = cmd.split_whitespace().next().unwrap_or_default();
                    match tern::control::text::render(name, &reply, format) {
                        Ok(out) => print!("{out}"),
                        Err(e) => {
                            eprintln!("tern ctl: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                    if reply.starts_with("error:") {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("tern ctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn ticket_keys(command: TicketKeysCommand) -> ExitCode {
    use tern::tls::ticket_keys as tk;
    let (file, outcome) = match command {
        TicketKeysCommand::New => {
            return match tk::generate() {
                Ok(k) => {
                    println!("{}", k.to_line());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tern ticket-keys: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        TicketKeysCommand::Stage { file } => {
            let r = tk::stage(&file);
            (file, r)
        }
        TicketKeysCommand::Promote { file, keep } => {
            let r = tk::promote(&file, keep);
            (file, r)
        }
        TicketKeysCommand::Rotate { file, keep } => {
            let r = tk::rotate(&file, keep);
            (file, r)
        }
    };
    match outcome {
        Ok(keys) => {
            // Key names only: the secrets stay in the file.
            let names: Vec<String> = keys.iter().map(|k| k.name_hex()).collect();
            println!(
                "{}: {} key(s), by name: {} (the first encrypts)",
                file.display(),
                keys.len(),
                names.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern ticket-keys: {}: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
