use clap::Parser;
use flotilla_cli::cli::{Cli, Command, ModelsCommand};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    flotilla_cli::init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Up(args) => flotilla_cli::up(args).await,
        Command::Scheduler(args) => flotilla_cli::scheduler(args).await,
        Command::Agent(args) => flotilla_cli::agent(args).await,
        Command::Models {
            command: ModelsCommand::MakeTest { dir },
        } => flotilla_cli::make_test_model(&dir),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
