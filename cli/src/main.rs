//! `vblk`: the daemon (`vblk daemon`) and the operator CLI that talks to it.

mod attach;
mod attachments;
mod cli_args;
mod client;
mod keys;
mod output;
mod pool_file;
mod qos;
mod server;
mod transfer;
mod units;

/// Generated from `proto/vblk.proto`.
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("vblk.v1");
}

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use cli_args::{CheckArgs, Cli, Command, PoolCmd, PoolCreateArgs};

/// Large blocks (the map cache's tables) on transparent huge pages: see HugePageAlloc.
#[global_allocator]
static ALLOC: vblk_engine::HugePageAlloc = vblk_engine::HugePageAlloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Client commands only: the daemon writes nothing to stdout, and a panic in one of its
    // threads must not end the process without stopping devices and committing the pool.
    if !matches!(cli.command, Command::Daemon(_)) {
        quiet_stdout_errors();
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vblk: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A closed or full standard output (`vblk vol list | head -1`, `> /dev/full`) is an error
/// message and an exit status, not a panic with a backtrace: `println!` panics when it cannot
/// write. A closed pipe exits with 141, the status of a command a SIGPIPE killed (as `rbd ls |
/// head` does, without the daemon-side risk of a real SIGPIPE disposition); another write error
/// exits 1 with `vblk: error:`.
fn quiet_stdout_errors() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied()).unwrap_or("");
        if let Some(why) = msg.strip_prefix("failed printing to stdout: ") {
            if why.starts_with("Broken pipe") {
                std::process::exit(141);
            }
            eprintln!("vblk: error: writing to standard output: {why}");
            std::process::exit(1);
        }
        default(info);
    }));
}

/// Allocator tunables for the daemon (`daemon_memory` bench, `pool status` memory figures):
/// - glibc gives every thread that allocates its own arena (up to 8 per core); with a worker per
///   queue, the daemon's freed memory then stays spread over dozens of partly used arenas. Two
///   arenas keep the footprint close to what is live.
/// - Large blocks (map tables, RocksDB memtable arenas) from mmap, returned to the system when
///   freed. glibc's default threshold rises to 32 MiB once such blocks are freed, after which
///   they come from the heap and, freed, stay there: measured 62 MiB of free heap held by a
///   daemon with 90 MiB in use.
///
/// `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` in the environment still win.
fn tune_malloc() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tunables; called before other threads exist.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: as above.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let (sock, json) = (cli.api_socket, cli.json);
    match cli.command {
        Command::Pool(PoolCmd::Create(a)) => pool_create(a, json),
        Command::Pool(PoolCmd::Rekey(a)) => pool_rekey(a, json),
        Command::Check(CheckArgs { pool: Some(p), meta_dir }) => check_offline(&p, meta_dir, json),
        Command::Daemon(a) => {
            tune_malloc();
            init_logging(&a.log_level)?;
            let api = a.socket.clone().unwrap_or(sock);
            runtime()?.block_on(server::run(a, api))?;
            Ok(ExitCode::SUCCESS)
        }
        cmd => runtime()?.block_on(async move {
            match cmd {
                Command::Pool(c) => client::pool(&sock, c, json).await,
                Command::Vol(c) => client::vol(&sock, c, json).await,
                Command::Snap(c) => client::snap(&sock, c, json).await,
                Command::CloneVol(a) => client::clone(&sock, a, json).await,
                Command::Diff(a) => client::diff(&sock, a, json).await,
                Command::Attach(a) => client::attach(&sock, a, json).await,
                Command::Detach(a) => client::detach(&sock, a, json).await,
                Command::Devices => client::devices(&sock, json).await,
                Command::Qos(c) => client::qos(&sock, c, json).await,
                Command::Check(_) => client::check(&sock, json).await,
                Command::Import(a) => client::import(&sock, a, json).await,
                Command::Export(a) => client::export(&sock, a, json).await,
                Command::Daemon(_) => unreachable!(),
            }
        }),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).with_context(|| format!("RUST_LOG={v:?}"))?,
        _ => EnvFilter::try_new(level).with_context(|| format!("--log-level {level:?}"))?,
    };
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(())
}

fn pool_create(a: PoolCreateArgs, json: bool) -> anyhow::Result<ExitCode> {
    let opts = vblk_engine::CreateOptions {
        size_bytes: a.size,
        meta_dir: a.meta_dir.clone(),
        force: a.force,
        preallocate: a.preallocate.into(),
    };
    let sb = vblk_engine::create_pool(&a.path, &opts).map_err(|e| anyhow::anyhow!(server::error_chain(&e)))?;
    let meta = a.meta_dir.unwrap_or_else(|| vblk_engine::default_meta_dir(&a.path));
    let total = sb.total_blocks * vblk_engine::BLOCK_SIZE;
    let uuid = vblk_engine::uuid_string(&sb.uuid);
    if json {
        output::json(&serde_json::json!({
            "path": a.path,
            "meta_dir": meta,
            "uuid": uuid,
            "format_version": sb.version,
            "total_bytes": total,
        }))?;
    } else {
        println!(
            "created pool {}: {} of data space, uuid {uuid}, metadata in {}",
            a.path.display(),
            units::format_size(total),
            meta.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn pool_rekey(a: cli_args::PoolRekeyArgs, json: bool) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let Some(old) = keys::master_key(&a.master_key)? else {
        anyhow::bail!("give the current master key with --master-key-file, --master-key-env or --master-key-cmd");
    };
    let new_bytes = std::fs::read(&a.new_key_file).with_context(|| format!("reading {}", a.new_key_file.display()))?;
    let new = keys::parse_key(&new_bytes).with_context(|| format!("new key file {}", a.new_key_file.display()))?;
    let opts = vblk_engine::PoolOptions { meta_dir: a.meta_dir, master_key: Some(old), ..Default::default() };
    let pool = vblk_engine::Pool::open(&a.path, &opts).map_err(|e| anyhow::anyhow!(server::error_chain(&e)))?;
    let n = pool.rotate_master_key(&new).map_err(|e| anyhow::anyhow!(server::error_chain(&e)))?;
    drop(pool);
    if json {
        output::json(&serde_json::json!({ "pool": a.path, "rewrapped_keys": n }))?;
    } else {
        println!("re-wrapped {n} key record(s) of {} under the new master key", a.path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn check_offline(path: &std::path::Path, meta_dir: Option<std::path::PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let opts = vblk_engine::PoolOptions { meta_dir, ..Default::default() };
    let pool = vblk_engine::Pool::open(path, &opts).map_err(|e| {
        let hint = if matches!(e, vblk_engine::Error::Locked { .. }) { "; run `vblk check` without --pool to check through the daemon" } else { "" };
        anyhow::anyhow!("{}{hint}", server::error_chain(&e))
    })?;
    let rep = pool.check().map_err(|e| anyhow::anyhow!(server::error_chain(&e)))?;
    drop(pool);
    client::print_check(&server::check_msg(&rep), json)
}
