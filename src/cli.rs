//! The command line: `devpocket [--config FILE] [serve | migrate | migrate-store | user create |
//! user set-plan | templates list | templates validate | templates render]`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::app;
use crate::auth::{self as rules, passwords::PasswordHashing};
use crate::clock::{SystemClock, db_now};
use crate::config::Config;
use crate::store::users::{self, NewUser, Plan, username_key};
use crate::templates;

#[derive(Parser, Debug)]
#[command(
    name = "devpocket",
    version,
    about = "DevPocket Server: the backend of a mobile-first cloud IDE"
)]
pub struct Cli {
    /// Configuration file (TOML) layered over the embedded defaults; see config/default.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Copy a single-node SQLite store into an empty PostgreSQL database (every table, sealed
    /// secrets as they are, in one transaction). Stop the server on the SQLite store first; then
    /// start the nodes on PostgreSQL with the SQLite node's seal key as `secrets.seal_key`.
    MigrateStore {
        /// The SQLite store: sqlite://PATH.
        #[arg(long, value_name = "URL")]
        from: String,
        /// The empty PostgreSQL database: postgres://USER:PASSWORD@HOST/DB (or set
        /// DEVPOCKET_MIGRATE_TO, which keeps the password out of the process list).
        #[arg(
            long,
            value_name = "URL",
            env = "DEVPOCKET_MIGRATE_TO",
            hide_env_values = true
        )]
        to: String,
    },
    /// Manage accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Environment templates (no database needed).
    #[command(subcommand)]
    Templates(TemplatesCommand),
}

#[derive(Subcommand, Debug)]
enum TemplatesCommand {
    /// List the templates: id, category, display name, docker.
    List {
        /// Also templates from this directory (*.yaml; same name replaces a built-in one).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Render every built-in template (and those in DIR) with sample values and check it; exits
    /// non-zero if any fails.
    Validate {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print a template's user-data rendered with sample values (fresh keys).
    Render {
        name: String,
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Create an account.
    Create {
        #[arg(long)]
        username: String,
        #[arg(long)]
        email: String,
        /// The password (visible to other local users in the process list: prefer --password-stdin).
        #[arg(long, conflicts_with = "password_stdin")]
        password: Option<String>,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
        /// free, starter, pro or admin.
        #[arg(long, default_value = "free")]
        plan: String,
        #[arg(long)]
        full_name: Option<String>,
    },
    /// Change the plan of an account given by username or e-mail.
    SetPlan { user: String, plan: String },
}

pub fn main() -> ExitCode {
    // Before any thread exists: every later allocation follows it.
    let big_blocks_returned = crate::memory::return_big_blocks();
    let cli = Cli::parse();
    // Template commands read files only: no configuration, runtime or database.
    if let Some(Command::Templates(command)) = cli.command {
        return exit_code(templates_command(command));
    }
    let config = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(errors) => {
            eprint!("{errors}");
            return ExitCode::from(2);
        }
    };
    crate::logging::init(&config.log);
    if !big_blocks_returned {
        tracing::warn!(
            "the allocator refused a fixed mmap threshold: memory may stay high after password hashing"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    exit_code(runtime.block_on(run(cli.command.unwrap_or(Command::Serve), config)))
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            let db = app::open_store(&config).await?;
            println!("database ({}) is up to date", db.backend());
            Ok(())
        }
        Command::MigrateStore { from, to } => migrate_store(&from, &to).await,
        Command::User(UserCommand::Create {
            username,
            email,
            password,
            password_stdin,
            plan,
            full_name,
        }) => {
            let password = match (password, password_stdin) {
                (Some(p), _) => p,
                (None, true) => {
                    let mut text = String::new();
                    std::io::stdin().read_to_string(&mut text)?;
                    text.trim_end_matches(['\r', '\n']).to_string()
                }
                (None, false) => bail!("give --password or --password-stdin"),
            };
            create_user(&config, &username, &email, &password, &plan, full_name).await
        }
        Command::User(UserCommand::SetPlan { user, plan }) => set_plan(&config, &user, &plan).await,
        Command::Templates(command) => templates_command(command),
    }
}

fn templates_command(command: TemplatesCommand) -> anyhow::Result<()> {
    match command {
        TemplatesCommand::List { dir } => list_templates(dir.as_deref()),
        TemplatesCommand::Validate { dir } => validate_templates(dir.as_deref()),
        TemplatesCommand::Render { name, dir } => render_template(&name, dir.as_deref()),
    }
}

fn list_templates(dir: Option<&Path>) -> anyhow::Result<()> {
    let all = templates::catalog(dir)?;
    let header = ["ID", "CATEGORY", "DISPLAY NAME", "DOCKER"];
    let rows: Vec<[&str; 4]> = all
        .iter()
        .map(|t| {
            let docker = if t.docker { "yes" } else { "no" };
            [t.id(), t.category.as_str(), t.display_name.as_str(), docker]
        })
        .collect();
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2)];
    for row in std::iter::once(header).chain(rows) {
        println!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    Ok(())
}

fn validate_templates(dir: Option<&Path>) -> anyhow::Result<()> {
    let mut results: Vec<(String, Result<usize, templates::TemplateError>)> = templates::builtin()
        .iter()
        .map(|t| (t.name.clone(), templates::check(t)))
        .collect();
    if let Some(dir) = dir {
        for (path, loaded) in templates::load_dir_each(dir)? {
            let name = match &loaded {
                Ok(t) => format!("{} from {}", t.name, path.display()),
                Err(_) => path.display().to_string(),
            };
            results.push((name, loaded.and_then(|t| templates::check(&t))));
        }
    }
    let total = results.len();
    let mut failed = 0;
    for (name, result) in results {
        match result {
            Ok(size) => println!("ok {name} ({:.1} KiB)", size as f64 / 1024.0),
            Err(e) => {
                failed += 1;
                println!("FAIL {e}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {total} templates failed");
    }
    Ok(())
}

fn render_template(name: &str, dir: Option<&Path>) -> anyhow::Result<()> {
    let all = templates::catalog(dir)?;
    let template = all
        .iter()
        .find(|t| t.name == name)
        .with_context(|| format!("no template '{name}'"))?;
    print!(
        "{}",
        templates::render(template, &templates::sample_vars())?
    );
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let signals = ShutdownSignals::install();
    raise_open_file_limit();
    let server = app::start(config, Arc::new(SystemClock)).await?;
    // Up: the code only start-up ran need not stay mapped, nor what a burst mapped once the
    // server is quiet again (see the function).
    let releaser = tokio::spawn(crate::memory::release_code_when_quiet());
    signals.wait().await;
    releaser.abort();
    tracing::info!("shutting down: draining requests");
    server.stop().await;
    Ok(())
}

/// Every terminal costs the server a few descriptors (its WebSocket, its SSH connection, on the
/// local provider the PTY and the SSH server's end), so the default soft limit of 1024 caps a
/// node near 250 terminals. Raise the soft `RLIMIT_NOFILE` to the hard limit, as servers
/// such as nginx (`worker_rlimit_nofile`) and OpenSSH's sshd do, and say so.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current >= limit.maximum {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    let shown = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |v| v.to_string());
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(
            from = %shown(limit.current),
            to = %shown(limit.maximum),
            "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)"),
    }
}

/// SIGTERM and Ctrl-C, listened for from before the server starts: a signal that arrives while
/// it starts (or just after it says it listens) still ends it gracefully, deregistering its node,
/// instead of killing it by the default disposition.
struct ShutdownSignals {
    term: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
        }
    }

    async fn wait(mut self) {
        async fn recv(signal: Option<&mut tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(self.term.as_mut()) => {}
            _ = recv(self.interrupt.as_mut()) => {}
        }
    }
}

async fn migrate_store(from: &str, to: &str) -> anyhow::Result<()> {
    use crate::store::DbUrl;
    let Some(DbUrl::Sqlite(path)) = DbUrl::parse(from) else {
        bail!("--from must be a SQLite store: sqlite://PATH");
    };
    if !path.is_file() {
        bail!("--from: no SQLite store at {}", path.display());
    }
    let Some(target @ DbUrl::Postgres(_)) = DbUrl::parse(to) else {
        bail!(
            "--to must be a PostgreSQL database: postgres://USER:PASSWORD@HOST/DB (value hidden)"
        );
    };
    // Held while copying: no server may change the store meanwhile.
    let _lock = crate::cluster::lock_sqlite(&path)?;
    let report = crate::store::copy::sqlite_to_postgres(&DbUrl::Sqlite(path.clone()), &target)
        .await
        .context("migrate-store")?;
    for (table, rows) in &report {
        println!("{table}: {rows} rows");
    }
    println!(
        "copied {} into PostgreSQL; start the nodes there with the same seal key (secrets.seal_key = the content of seal.key in the old data dir)",
        path.display()
    );
    Ok(())
}

fn parse_plan(plan: &str) -> anyhow::Result<Plan> {
    Plan::parse(plan).with_context(|| format!("unknown plan '{plan}' (free, starter, pro, admin)"))
}

async fn create_user(
    config: &Config,
    username: &str,
    email: &str,
    password: &str,
    plan: &str,
    full_name: Option<String>,
) -> anyhow::Result<()> {
    let plan = parse_plan(plan)?;
    let email = email.trim().to_lowercase();
    let username = username.trim();
    let mut errors = Vec::new();
    rules::check_username("--username", username, &mut errors);
    rules::check_email("--email", &email, &mut errors);
    rules::check_password("--password", password, &mut errors);
    if !errors.is_empty() {
        let lines: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        bail!("{}", lines.join("; "));
    }
    let db = app::open_store(config).await?;
    let mut conn = db.get().await?;
    if users::by_email(&mut conn, &email).await?.is_some() {
        bail!("Email already registered");
    }
    if users::by_username(&mut conn, username).await?.is_some() {
        bail!("Username already taken");
    }
    let hash = PasswordHashing::new(1, 0)
        .admit()
        .map_err(anyhow::Error::from)?
        .hash(password)
        .await?;
    let now = db_now(&SystemClock);
    let user = users::insert(
        &mut conn,
        &NewUser {
            id: uuid::Uuid::new_v4().to_string(),
            username: username.to_string(),
            username_key: username_key(username),
            email,
            password_hash: Some(hash),
            full_name,
            avatar_url: None,
            google_id: None,
            is_active: true,
            is_verified: false,
            subscription_plan: plan.as_str().to_string(),
            created_at: now,
            updated_at: now,
            last_login: None,
        },
    )
    .await?;
    println!(
        "created user {} ({}) on plan {}",
        user.username,
        user.id,
        plan.as_str()
    );
    Ok(())
}

async fn set_plan(config: &Config, login: &str, plan: &str) -> anyhow::Result<()> {
    let plan = parse_plan(plan)?;
    let db = app::open_store(config).await?;
    let mut conn = db.get().await?;
    let user = users::by_login(&mut conn, login)
        .await?
        .with_context(|| format!("no user '{login}'"))?;
    users::set_plan(&mut conn, &user.id, plan, db_now(&SystemClock)).await?;
    println!("{} is now on plan {}", user.username, plan.as_str());
    Ok(())
}
