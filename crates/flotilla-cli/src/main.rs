use clap::Parser;

// The scheduler allocates per request (headers, JSON, buffers) on every worker thread;
// mimalloc's per-thread heaps cut that cost to a fraction of glibc's (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use flotilla_cli::cli::{BenchCommand, Cli, Command, ModelsCommand};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let logs = flotilla_cli::init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Up(args) => flotilla_cli::up(args).await,
        Command::Scheduler(args) => flotilla_cli::scheduler(args).await,
        Command::Agent(args) => flotilla_cli::agent(args).await,
        Command::Status(args) => flotilla_cli::status::run(&args).await,
        Command::Reload(args) => flotilla_cli::reload(&args).await,
        Command::Chat(args) => flotilla_cli::chat::run(&args).await,
        Command::Models {
            command:
                ModelsCommand::Pull {
                    repo_id,
                    cache_dir,
                    endpoint,
                },
        } => flotilla_cli::pull_model(&repo_id, cache_dir.as_deref(), endpoint.as_deref()).await,
        Command::Models {
            command: ModelsCommand::MakeTest { dir, size },
        } => flotilla_cli::make_test_model(&dir, size),
        Command::Models {
            command: ModelsCommand::ToGguf { model, out, quant },
        } => flotilla_cli::to_gguf(&model, &out, quant),
        Command::Simulate(args) => {
            // CPU work, seconds for large traces: off the runtime's workers.
            tokio::task::spawn_blocking(move || flotilla_cli::simulate::run(&args))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("simulation panicked: {e}")))
        }
        Command::Keys { command } => flotilla_cli::ledger::keys(command).await,
        Command::Report { command } => flotilla_cli::ledger::report(command).await,
        Command::Bench {
            command: BenchCommand::Engine(args),
        } => {
            // Minutes of CPU work: off the runtime's workers.
            tokio::task::spawn_blocking(move || flotilla_cli::bench_engine(&args))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("benchmark panicked: {e}")))
        }
    };
    // Every log line out before the final word.
    drop(logs);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
