//! Environment templates: the metadata the API lists and the cloud-init user-data that provisions
//! an environment.
//!
//! One YAML document per template (`templates/*.yaml`, embedded in the binary; operators may add
//! or override templates from a directory). `user_data` is a minijinja template of a
//! `#cloud-config` document; [`render`] fills it with one environment's values and [`validate`]
//! renders it with sample values (fresh keys, a hostile environment variable) and checks the
//! facts the backend relies on: the `dev` user, the pinned ed25519 host key, the progress markers
//! and the size bound. The format is described in `templates/README.md`.
//!
//! Values that come from users reach the YAML only through the `tojson` filter: a JSON string,
//! which YAML reads as a double-quoted scalar, with every character YAML or cloud-init's parser
//! could read differently escaped. Nothing a user types can end the scalar or add a key.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context as _;
use minijinja::{Environment, UndefinedBehavior, Value};
use serde::{Deserialize, Deserializer, Serialize};
use serde_norway::Value as Yaml;

/// Largest rendered user-data. Contabo documents no limit, but its WAF has rejected large
/// payloads (shared/contabo/NOTES.md §2.8); 16 KiB is the safe target.
pub const MAX_USER_DATA: usize = 16 * 1024;

/// minijinja instructions one render of a user-data template may run. The shipped templates use
/// a few thousand (see the `shipped_templates_stay_well_within_the_fuel` test); a loop template
/// an admin posts (`{% for i in range(100000) %}` nested, which burnt 10 s of CPU before this
/// bound) runs out in a few milliseconds and is refused as a render error (422 on the API).
pub const RENDER_FUEL: u64 = 200_000;

/// What starts a progress marker line in `/var/log/cloud-init-output.log`:
/// `devpocket-progress: <percent 0-100> <phase words>`.
pub const PROGRESS_PREFIX: &str = "devpocket-progress: ";

/// The password the sample variables' hash is made from (see [`sample_vars`]).
pub const SAMPLE_PASSWORD: &str = "devpocket-sample-password";
const SAMPLE_PASSWORD_HASH: &str = "$6$Fk5BpK1qzVn8cWjD$cDzX1by.Dim9v0zyTTRlXWL6yFE5N6fmuHARryWSzPKsJ7j5BXWgSQ5jmdr8.q9r2tc3Pz6tfLpwSFyybE5Ry/";
/// A sample environment variable whose value tries every way out of a YAML scalar.
pub const SAMPLE_HOSTILE_VARIABLE: &str = "DEVPOCKET_SAMPLE_HOSTILE";
const SAMPLE_HOSTILE_VALUE: &str = "it's \"quoted\" \\ $HOME `id` $(id)\n#cloud-config\n\
     devpocket_injected: true\nruncmd: [reboot]\n  - {a: b}\r\n\u{85}\u{2028}\u{2029}\u{7f}\u{feff}\t# end";
/// The top-level key the hostile sample value tries to add.
const INJECTED_KEY: &str = "devpocket_injected";

/// Packages every environment gets (the `packages:` list must hold them).
const BASE_PACKAGES: [&str; 4] = ["git", "build-essential", "curl", "tmux"];
/// Settings the tmux config must carry (phone keyboards, long scrollback, resizing phones).
const TMUX_SETTINGS: [&str; 5] = [
    "set -sg escape-time",
    "set -g history-limit",
    "set -g mouse on",
    "default-terminal",
    "set -g aggressive-resize on",
];

/// The built-in templates, in the order the catalogue lists them.
const BUILTIN: [(&str, &str); 6] = [
    ("ubuntu", include_str!("../templates/ubuntu.yaml")),
    ("python", include_str!("../templates/python.yaml")),
    ("nodejs", include_str!("../templates/nodejs.yaml")),
    ("golang", include_str!("../templates/golang.yaml")),
    ("rust", include_str!("../templates/rust.yaml")),
    (
        "coding-agent",
        include_str!("../templates/coding-agent.yaml"),
    ),
];

/// Suggested machine size, as Kubernetes-style quantity strings: `cpu` in vCPUs (`"2"`, or
/// millicores `"500m"`), `memory` in `Mi`/`Gi` (`"4Gi"`), `storage` in `Gi`/`Ti` (`"50Gi"`).
/// YAML numbers are accepted and kept as their text.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(deserialize_with = "string_or_number")]
    pub cpu: String,
    #[serde(deserialize_with = "string_or_number")]
    pub memory: String,
    #[serde(deserialize_with = "string_or_number")]
    pub storage: String,
}

impl Resources {
    /// CPU in millicores (`"2"` → 2000, `"500m"` → 500).
    pub fn cpu_millis(&self) -> Option<u64> {
        match self.cpu.strip_suffix('m') {
            Some(m) => number(m).filter(|&m| m > 0),
            None => number(&self.cpu)?.checked_mul(1000).filter(|&m| m > 0),
        }
    }
    /// Memory in MiB (`"4Gi"` → 4096).
    pub fn memory_mib(&self) -> Option<u64> {
        quantity(&self.memory, &[("Mi", 1), ("Gi", 1024)])
    }
    /// Storage in GiB (`"50Gi"` → 50, `"1Ti"` → 1024).
    pub fn storage_gib(&self) -> Option<u64> {
        quantity(&self.storage, &[("Gi", 1), ("Ti", 1024)])
    }
}

fn number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn quantity(text: &str, units: &[(&str, u64)]) -> Option<u64> {
    units.iter().find_map(|(suffix, factor)| {
        let n = number(text.strip_suffix(suffix)?)?;
        n.checked_mul(*factor).filter(|&v| v > 0)
    })
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Quantity {
        Text(String),
        Int(u64),
        Float(f64),
    }
    Ok(match Quantity::deserialize(d)? {
        Quantity::Text(s) => s,
        Quantity::Int(n) => n.to_string(),
        Quantity::Float(f) => f.to_string(),
    })
}

fn active() -> String {
    "active".into()
}

/// One environment template, as its YAML file spells it (see `templates/README.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// The id: lower-case letters, digits and `-`; equal to the file name.
    pub name: String,
    pub display_name: String,
    pub description: String,
    /// `general`, `language`, `ai`, ...
    pub category: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub default_resources: Resources,
    /// Defaults; an environment's own variables override them.
    #[serde(default)]
    pub environment_variables: BTreeMap<String, String>,
    #[serde(default)]
    pub installed_tools: Vec<String>,
    #[serde(default = "active")]
    pub status: String,
    pub version: String,
    #[serde(default)]
    pub documentation_url: Option<String>,
    #[serde(default)]
    pub icon_url: Option<String>,
    /// The template installs Docker (`docker.io`) and puts `dev` in group `docker`.
    #[serde(default)]
    pub docker: bool,
    /// Shell commands the local provider runs (`sh -c`) in a new workspace: quick, idempotent,
    /// no sudo, no network installs.
    #[serde(default)]
    pub local_setup: Vec<String>,
    /// minijinja template of the `#cloud-config` document (variables: see [`render`]).
    pub user_data: String,
}

impl Template {
    pub fn id(&self) -> &str {
        &self.name
    }

    /// The fields of API.md (`GET /api/v1/templates`); never the user-data.
    pub fn api_view(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.name,
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "category": self.category,
            "tags": self.tags,
            "default_resources": self.default_resources,
            "environment_variables": self.environment_variables,
            "installed_tools": self.installed_tools,
            "status": self.status,
            "version": self.version,
            "documentation_url": self.documentation_url,
            "icon_url": self.icon_url,
        })
    }
}

/// One environment's values for [`render`].
#[derive(Clone, Debug)]
pub struct RenderVars {
    pub environment_id: String,
    pub environment_name: String,
    /// A valid host name (see [`hostname_for`]).
    pub hostname: String,
    /// SHA-512 crypt hash of the `dev` password ([`hash_password`]); never the password.
    pub dev_password_hash: String,
    /// The OpenSSH public key line the server logs in with.
    pub ssh_authorized_key: String,
    /// The environment's ed25519 host key, OpenSSH PEM, generated by the server (pinned).
    pub host_key_private: String,
    /// Its public line (`ssh-ed25519 AAAA...`).
    pub host_key_public: String,
    /// The environment's own variables; they override the template's defaults.
    pub environment_variables: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The text is not a template document (YAML syntax, a missing or mistyped field).
    #[error("{template}: not a valid template file: {message}")]
    Parse { template: String, message: String },
    /// A template file could not be read.
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// The metadata, the render variables or the rendered user-data break a rule.
    #[error("{template}: {problem}")]
    Invalid { template: String, problem: String },
    /// `user_data` does not render (template syntax, an unknown variable, a filter error).
    #[error("{template}: user_data does not render: {message}")]
    Render { template: String, message: String },
    /// An environment variable name outside `^[A-Za-z_][A-Za-z0-9_]*$`.
    #[error(
        "{template}: environment variable name {name:?} is not valid \
         (letters, digits and _, not starting with a digit)"
    )]
    VariableName { template: String, name: String },
    /// An environment variable value a shell cannot hold (a NUL byte).
    #[error("{template}: environment variable {name} contains a NUL byte")]
    VariableValue { template: String, name: String },
    /// The rendered user-data is over [`MAX_USER_DATA`].
    #[error("{template}: user_data is over the limit of {limit} bytes ({size} bytes or more)")]
    TooLarge {
        template: String,
        size: usize,
        limit: usize,
    },
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

impl TemplateError {
    /// The problem lies in what a user sent (variables, their size), not in the template or the
    /// server: the API answers 422.
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            Self::VariableName { .. } | Self::VariableValue { .. } | Self::TooLarge { .. }
        )
    }
}

fn invalid(template: &str, problem: impl Into<String>) -> TemplateError {
    TemplateError::Invalid {
        template: template.to_string(),
        problem: problem.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Loading

/// The built-in templates (`templates/*.yaml`, embedded). A unit test guarantees they parse and
/// validate.
pub fn builtin() -> Vec<Template> {
    static CACHE: OnceLock<Vec<Template>> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            BUILTIN
                .iter()
                .map(|(name, text)| {
                    parse_labeled(text, name).unwrap_or_else(|e| panic!("built-in template: {e}"))
                })
                .collect()
        })
        .clone()
}

/// Parses one template document.
pub fn parse(text: &str) -> Result<Template, TemplateError> {
    parse_labeled(text, "template")
}

/// Parses, naming the template in errors by its `name` when it has one, else by `label`.
fn parse_labeled(text: &str, label: &str) -> Result<Template, TemplateError> {
    serde_norway::from_str::<Template>(text).map_err(|e| {
        let name = serde_norway::from_str::<Yaml>(text)
            .ok()
            .and_then(|v| v.get("name").and_then(Yaml::as_str).map(str::to_string));
        TemplateError::Parse {
            template: name.unwrap_or_else(|| label.to_string()),
            message: e.to_string(),
        }
    })
}

/// Reads one template file; its `name` must equal the file name without `.yaml`/`.yml`.
pub fn load_file(path: &Path) -> Result<Template, TemplateError> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| TemplateError::File {
        path: label.clone(),
        message: e.to_string(),
    })?;
    let template = parse_labeled(&text, &label).map_err(|e| match e {
        TemplateError::Parse { message, .. } => TemplateError::Parse {
            template: label.clone(),
            message,
        },
        other => other,
    })?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if template.name != stem {
        return Err(invalid(
            &label,
            format!("name '{}' differs from the file name", template.name),
        ));
    }
    Ok(template)
}

/// Every `*.yaml`/`*.yml` file of `dir` (sorted), each with its parse result.
pub fn load_dir_each(
    dir: &Path,
) -> anyhow::Result<Vec<(PathBuf, Result<Template, TemplateError>)>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read template directory {}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read template directory {}", dir.display()))?
            .path();
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if yaml && !hidden && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths
        .into_iter()
        .map(|p| {
            let t = load_file(&p);
            (p, t)
        })
        .collect())
}

/// Extra or overriding templates from an operator's directory; fails on the first bad file.
pub fn load_dir(dir: &Path) -> anyhow::Result<Vec<Template>> {
    load_dir_each(dir)?
        .into_iter()
        .map(|(_, t)| t.map_err(anyhow::Error::from))
        .collect()
}

/// The built-in templates with those of `dir` added (a template of the same name replaces the
/// built-in one).
pub fn catalog(dir: Option<&Path>) -> anyhow::Result<Vec<Template>> {
    let mut all = builtin();
    if let Some(dir) = dir {
        for t in load_dir(dir)? {
            match all.iter_mut().find(|b| b.name == t.name) {
                Some(slot) => *slot = t,
                None => all.push(t),
            }
        }
    }
    Ok(all)
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// What the user-data template sees.
#[derive(Serialize)]
struct RenderContext<'a> {
    template: &'a str,
    environment_id: &'a str,
    environment_name: &'a str,
    hostname: &'a str,
    dev_password_hash: &'a str,
    ssh_authorized_key: &'a str,
    host_key_private: &'a str,
    host_key_public: &'a str,
    environment_variables: &'a BTreeMap<String, String>,
    env_file: String,
    docker: bool,
}

/// Renders the template's user-data for one environment: the cloud-config text to send.
///
/// The template sees `template`, `environment_id`, `environment_name`, `hostname`,
/// `dev_password_hash`, `ssh_authorized_key`, `host_key_private` (trimmed PEM, for a block
/// scalar with `indent`), `host_key_public`, `environment_variables` (template defaults
/// overridden by the environment's), `env_file` (those variables as a shell script of
/// single-quoted `export`s) and `docker`; filters `tojson` (a YAML-safe JSON string) and
/// `shquote` (a single-quoted shell word). Unknown variables are errors.
pub fn render(t: &Template, vars: &RenderVars) -> Result<String, TemplateError> {
    render_with_fuel(t, vars, RENDER_FUEL)
}

fn render_with_fuel(t: &Template, vars: &RenderVars, fuel: u64) -> Result<String, TemplateError> {
    check_render_vars(t, vars)?;
    let variables = merged_variables(t, vars)?;
    let ctx = RenderContext {
        template: &t.name,
        environment_id: &vars.environment_id,
        environment_name: &vars.environment_name,
        hostname: &vars.hostname,
        dev_password_hash: &vars.dev_password_hash,
        ssh_authorized_key: &vars.ssh_authorized_key,
        host_key_private: vars.host_key_private.trim_end(),
        host_key_public: vars.host_key_public.trim(),
        environment_variables: &variables,
        env_file: env_file(&variables),
        docker: t.docker,
    };
    let render_error = |e: minijinja::Error| TemplateError::Render {
        template: t.name.clone(),
        message: e.to_string(),
    };
    let mut env = jinja();
    env.set_fuel(Some(fuel));
    let template = env.template_from_str(&t.user_data).map_err(render_error)?;
    // Written into a buffer that refuses to grow past the limit, so a template that expands
    // (`{{ "x" * 10000000 }}` in a loop) stops at the limit instead of filling memory.
    let mut out = BoundedBuffer(Vec::with_capacity(4096));
    if let Err(e) = template.render_captured_to(ctx, &mut out) {
        if out.0.len() > MAX_USER_DATA {
            return Err(TemplateError::TooLarge {
                template: t.name.clone(),
                size: out.0.len(),
                limit: MAX_USER_DATA,
            });
        }
        return Err(render_error(e));
    }
    if out.0.len() > MAX_USER_DATA {
        return Err(TemplateError::TooLarge {
            template: t.name.clone(),
            size: out.0.len(),
            limit: MAX_USER_DATA,
        });
    }
    String::from_utf8(out.0).map_err(|e| TemplateError::Render {
        template: t.name.clone(),
        message: e.to_string(),
    })
}

/// A render target holding at most [`MAX_USER_DATA`] + 1 bytes: a write past that fills it to
/// one byte over (so the size check sees the overflow) and then fails, ending the render.
struct BoundedBuffer(Vec<u8>);

impl std::io::Write for BoundedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = (MAX_USER_DATA + 1).saturating_sub(self.0.len());
        if room == 0 {
            return Err(std::io::Error::other("user_data is over the size limit"));
        }
        let n = buf.len().min(room);
        self.0.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn jinja() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_fuel(Some(RENDER_FUEL));
    env.add_filter("tojson", tojson);
    env.add_filter("shquote", |s: String| shell_quote(&s));
    env
}

/// JSON text of a value, with every character that YAML 1.1 (cloud-init's PyYAML) would read as
/// a line break or refuse as unprintable escaped as `\uXXXX`: valid JSON and a YAML scalar that
/// reads back exactly.
fn tojson(value: Value) -> Result<String, minijinja::Error> {
    if value.is_undefined() {
        return Err(minijinja::Error::from(minijinja::ErrorKind::UndefinedError));
    }
    let json = serde_json::to_string(&value).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    Ok(yaml_safe(&json))
}

fn yaml_safe(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        let unsafe_char = matches!(c, '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}')
            || matches!(c, '\u{feff}' | '\u{fffe}' | '\u{ffff}');
        if unsafe_char {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// A single-quoted POSIX shell word: nothing inside is expanded.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The environment's variables as a shell script for `/etc/profile.d`.
fn env_file(variables: &BTreeMap<String, String>) -> String {
    let mut text = String::from("# DevPocket: this environment's variables (set in the app).\n");
    for (name, value) in variables {
        let _ = writeln!(text, "export {name}={}", shell_quote(value));
    }
    text
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`
pub fn valid_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn merged_variables(
    t: &Template,
    vars: &RenderVars,
) -> Result<BTreeMap<String, String>, TemplateError> {
    let mut all = t.environment_variables.clone();
    all.extend(vars.environment_variables.clone());
    for (name, value) in &all {
        if !valid_variable_name(name) {
            return Err(TemplateError::VariableName {
                template: t.name.clone(),
                name: name.clone(),
            });
        }
        if value.contains('\0') {
            return Err(TemplateError::VariableValue {
                template: t.name.clone(),
                name: name.clone(),
            });
        }
    }
    Ok(all)
}

/// The server's own values must have their shape: a mistake here (a plain password, a key in
/// the wrong format) must fail loudly, not provision a broken machine.
fn check_render_vars(t: &Template, v: &RenderVars) -> Result<(), TemplateError> {
    let bad = |what: &str| invalid(&t.name, format!("render variables: {what}"));
    if !valid_hostname(&v.hostname) {
        return Err(bad("hostname is not a valid host name"));
    }
    let hash_chars = |c: char| c.is_ascii_alphanumeric() || "./$=".contains(c);
    if !v.dev_password_hash.starts_with("$6$") || !v.dev_password_hash.chars().all(hash_chars) {
        return Err(bad(
            "dev_password_hash must be a SHA-512 crypt hash ($6$...), never a password",
        ));
    }
    if !one_line(&v.ssh_authorized_key) || v.ssh_authorized_key.split(' ').count() < 2 {
        return Err(bad(
            "ssh_authorized_key must be one OpenSSH public key line",
        ));
    }
    if !v.host_key_public.trim().starts_with("ssh-ed25519 ") || !one_line(v.host_key_public.trim())
    {
        return Err(bad(
            "host_key_public must be one ssh-ed25519 public key line",
        ));
    }
    if !is_openssh_pem(&v.host_key_private) {
        return Err(bad("host_key_private must be an OpenSSH private key (PEM)"));
    }
    Ok(())
}

fn one_line(s: &str) -> bool {
    !s.trim().is_empty() && !s.chars().any(char::is_control)
}

/// Header, base64 lines, footer: nothing that could end a YAML block scalar.
fn is_openssh_pem(pem: &str) -> bool {
    const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    const END: &str = "-----END OPENSSH PRIVATE KEY-----";
    let lines: Vec<&str> = pem.trim_end().lines().collect();
    let body_ok = |l: &&str| {
        !l.is_empty()
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
    };
    !pem.contains('\r')
        && lines.len() >= 3
        && lines.first() == Some(&BEGIN)
        && lines.last() == Some(&END)
        && lines[1..lines.len() - 1].iter().all(body_ok)
}

/// RFC 1123 host name: labels of letters, digits and `-`, at most 253 characters.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// A valid host name made from an environment name (`My_Env` → `my-env`).
pub fn hostname_for(environment_name: &str) -> String {
    let mapped: String = environment_name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let trimmed: String = mapped.trim_matches('-').chars().take(63).collect();
    let trimmed = trimmed.trim_end_matches('-');
    if trimmed.is_empty() {
        "devpocket".into()
    } else {
        trimmed.to_string()
    }
}

/// SHA-512 crypt (`$6$<salt>$<hash>`, 5000 rounds, random salt): what cloud-init's `passwd`
/// takes.
pub fn hash_password(password: &str) -> Result<String, TemplateError> {
    sha_crypt::sha512_simple(password, &sha_crypt::Sha512Params::default())
        .map_err(|e| TemplateError::Hash(format!("{e:?}")))
}

/// Sample values: fresh ed25519 keys, the hash of [`SAMPLE_PASSWORD`], a plain and a hostile
/// environment variable ([`SAMPLE_HOSTILE_VARIABLE`]).
///
/// # Panics
/// If the system's random generator fails (key generation); [`validate`] reports that instead.
pub fn sample_vars() -> RenderVars {
    match try_sample_vars() {
        Ok(vars) => vars,
        Err(e) => panic!("sample variables: {e}"),
    }
}

fn try_sample_vars() -> Result<RenderVars, TemplateError> {
    let key_error = |e: russh::keys::ssh_key::Error| invalid("sample", format!("ed25519 key: {e}"));
    let new_key = || {
        russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
            .map_err(key_error)
    };
    let host = new_key()?;
    let client = new_key()?;
    let host_key_private = host
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(key_error)?
        .to_string();
    let host_key_public = host.public_key().to_openssh().map_err(key_error)?;
    let ssh_authorized_key = client.public_key().to_openssh().map_err(key_error)?;
    Ok(RenderVars {
        environment_id: "00000000-0000-4000-8000-000000000000".into(),
        environment_name: "sample".into(),
        hostname: "devpocket-sample".into(),
        dev_password_hash: SAMPLE_PASSWORD_HASH.into(),
        ssh_authorized_key: format!("{ssh_authorized_key} devpocket-server"),
        host_key_private,
        host_key_public,
        environment_variables: BTreeMap::from([
            ("DEVPOCKET_SAMPLE".to_string(), "hello world".to_string()),
            (
                SAMPLE_HOSTILE_VARIABLE.to_string(),
                SAMPLE_HOSTILE_VALUE.to_string(),
            ),
        ]),
    })
}

// ---------------------------------------------------------------------------------------------
// Progress markers

/// Reads a progress marker line (`devpocket-progress: 40 toolchain`) → `(40, "toolchain")`.
pub fn parse_progress(line: &str) -> Option<(u8, &str)> {
    let rest = line.trim().strip_prefix(PROGRESS_PREFIX)?;
    let (percent, phase) = rest.split_once(' ')?;
    let percent: u8 = number(percent)?.try_into().ok()?;
    let phase = phase.trim();
    let words_ok = !phase.is_empty()
        && phase
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == ' ' || c == '-');
    (percent <= 100 && words_ok).then_some((percent, phase))
}

/// The marker a `bootcmd`/`runcmd` item echoes, if it is one: `echo "devpocket-progress: N
/// words"` as a string, or a list ending in `echo`, `devpocket-progress: N words`.
fn marker_of(item: &Yaml) -> Result<Option<(u8, String)>, String> {
    let text = match item {
        Yaml::String(s) => s.clone(),
        Yaml::Sequence(parts) => {
            let words: Option<Vec<&str>> = parts.iter().map(Yaml::as_str).collect();
            let words = words.ok_or("a command list holds a value that is not a string")?;
            match words.as_slice() {
                [.., "echo", last] if last.contains(PROGRESS_PREFIX) => format!("echo \"{last}\""),
                _ => words.join(" "),
            }
        }
        _ => return Err("a command is neither a string nor a list (unquoted ': '?)".into()),
    };
    if !text.contains(PROGRESS_PREFIX.trim_end()) {
        return Ok(None);
    }
    text.strip_prefix("echo \"")
        .and_then(|t| t.strip_suffix('"'))
        .and_then(parse_progress)
        .map(|(p, phase)| Some((p, phase.to_string())))
        .ok_or_else(|| {
            format!(
                "progress marker not in the form echo \"{PROGRESS_PREFIX}<0-100> <phase>\": {text}"
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Validation

/// Checks a template: its metadata, then its user-data rendered with [`sample_vars`].
pub fn validate(t: &Template) -> Result<(), TemplateError> {
    check(t).map(|_| ())
}

/// [`validate`], returning the size in bytes of the rendered sample user-data.
pub fn check(t: &Template) -> Result<usize, TemplateError> {
    check_metadata(t).map_err(|p| invalid(&t.name, p))?;
    let vars = try_sample_vars()?;
    let text = render(t, &vars)?;
    check_user_data(t, &vars, &text).map_err(|p| invalid(&t.name, p))?;
    Ok(text.len())
}

fn valid_name(name: &str) -> bool {
    name.len() <= 50
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn check_metadata(t: &Template) -> Result<(), String> {
    if !valid_name(&t.name) {
        return Err(format!(
            "name '{}' must match ^[a-z0-9][a-z0-9-]*$ (at most 50 characters)",
            t.name
        ));
    }
    for (field, value) in [
        ("display_name", &t.display_name),
        ("description", &t.description),
        ("status", &t.status),
        ("version", &t.version),
        ("user_data", &t.user_data),
    ] {
        if value.trim().is_empty() {
            return Err(format!("{field} is empty"));
        }
    }
    if !valid_name(&t.category) {
        return Err(format!(
            "category '{}' must be lower-case (general, language, ai, ...)",
            t.category
        ));
    }
    if let Some(list) = [("tags", &t.tags), ("installed_tools", &t.installed_tools)]
        .into_iter()
        .find(|(_, l)| l.iter().any(|s| s.trim().is_empty()))
    {
        return Err(format!("{} holds an empty entry", list.0));
    }
    check_resources(&t.default_resources)?;
    for name in t.environment_variables.keys() {
        if !valid_variable_name(name) {
            return Err(format!("environment variable name {name:?} is not valid"));
        }
    }
    for (field, url) in [
        ("documentation_url", &t.documentation_url),
        ("icon_url", &t.icon_url),
    ] {
        if let Some(url) = url
            && !url.starts_with("https://")
            && !url.starts_with("http://")
        {
            return Err(format!("{field} '{url}' is not an http(s) URL"));
        }
    }
    for step in &t.local_setup {
        if !one_line(step) {
            return Err(format!(
                "local_setup step {step:?} must be one non-empty line"
            ));
        }
        if step.split_whitespace().any(|w| w == "sudo") {
            return Err(format!("local_setup step {step:?} uses sudo"));
        }
    }
    if !t.user_data.trim_start().starts_with("#cloud-config") {
        return Err("user_data must start with #cloud-config".into());
    }
    Ok(())
}

fn check_resources(r: &Resources) -> Result<(), String> {
    if r.cpu_millis().is_none() {
        return Err(format!(
            "default_resources.cpu '{}' is not a CPU count (\"2\" or \"500m\")",
            r.cpu
        ));
    }
    if r.memory_mib().is_none() {
        return Err(format!(
            "default_resources.memory '{}' is not a quantity like \"4Gi\" or \"512Mi\"",
            r.memory
        ));
    }
    if r.storage_gib().is_none() {
        return Err(format!(
            "default_resources.storage '{}' is not a quantity like \"50Gi\" or \"1Ti\"",
            r.storage
        ));
    }
    Ok(())
}

fn strings(v: Option<&Yaml>) -> Vec<&str> {
    match v {
        Some(Yaml::Sequence(items)) => items.iter().filter_map(Yaml::as_str).collect(),
        Some(Yaml::String(s)) => s.split(',').map(str::trim).collect(),
        _ => Vec::new(),
    }
}

/// The facts of the rendered sample the backend relies on (NOTES §9).
fn check_user_data(t: &Template, vars: &RenderVars, text: &str) -> Result<(), String> {
    if !text.starts_with("#cloud-config\n") {
        return Err("rendered user_data must start with a #cloud-config line".into());
    }
    let doc: Yaml =
        serde_norway::from_str(text).map_err(|e| format!("rendered user_data is not YAML: {e}"))?;
    if doc.as_mapping().is_none() {
        return Err("rendered user_data is not a YAML mapping".into());
    }
    if doc.get(INJECTED_KEY).is_some() {
        return Err(format!(
            "a sample environment variable added the top-level key '{INJECTED_KEY}': \
             user values must go through | tojson"
        ));
    }
    check_dev_user(t, vars, &doc)?;
    check_host_keys(vars, &doc)?;
    check_files(t, vars, &doc)?;
    check_packages(t, &doc)?;
    check_markers(&doc)
}

fn check_dev_user(t: &Template, vars: &RenderVars, doc: &Yaml) -> Result<(), String> {
    let users = doc.get("users").and_then(Yaml::as_sequence);
    let dev = users
        .and_then(|u| {
            u.iter()
                .find(|u| u.get("name").and_then(Yaml::as_str) == Some("dev"))
        })
        .ok_or("users: has no user 'dev'")?;
    let field = |k: &str| dev.get(k);
    if field("lock_passwd").and_then(Yaml::as_bool) != Some(false) {
        return Err("users/dev: lock_passwd must be false (else the password never works)".into());
    }
    if field("passwd").and_then(Yaml::as_str) != Some(vars.dev_password_hash.as_str()) {
        return Err("users/dev: passwd must be {{ dev_password_hash | tojson }}".into());
    }
    if field("shell").and_then(Yaml::as_str) != Some("/bin/bash") {
        return Err("users/dev: shell must be /bin/bash".into());
    }
    if !field("sudo")
        .and_then(Yaml::as_str)
        .is_some_and(|s| s.contains("NOPASSWD:ALL"))
    {
        return Err("users/dev: sudo must be \"ALL=(ALL) NOPASSWD:ALL\"".into());
    }
    let groups = strings(field("groups"));
    if !groups.contains(&"adm") {
        return Err("users/dev: groups must include adm (to read cloud-init-output.log)".into());
    }
    if t.docker && !groups.contains(&"docker") {
        return Err("users/dev: groups must include docker (the template has docker: true)".into());
    }
    if !strings(field("ssh_authorized_keys")).contains(&vars.ssh_authorized_key.as_str()) {
        return Err(
            "users/dev: ssh_authorized_keys must hold {{ ssh_authorized_key | tojson }}".into(),
        );
    }
    Ok(())
}

fn check_host_keys(vars: &RenderVars, doc: &Yaml) -> Result<(), String> {
    let keys = doc
        .get("ssh_keys")
        .ok_or("ssh_keys: missing (the host key is pinned)")?;
    let private = keys.get("ed25519_private").and_then(Yaml::as_str);
    if private.map(str::trim_end) != Some(vars.host_key_private.trim_end()) {
        return Err(
            "ssh_keys: ed25519_private must be {{ host_key_private }} as a block scalar".into(),
        );
    }
    if keys.get("ed25519_public").and_then(Yaml::as_str) != Some(vars.host_key_public.trim()) {
        return Err("ssh_keys: ed25519_public must be {{ host_key_public | tojson }}".into());
    }
    if strings(doc.get("ssh_genkeytypes")) != ["ed25519"] {
        return Err("ssh_genkeytypes must be [ed25519] (no unpinned host keys)".into());
    }
    Ok(())
}

fn check_files(t: &Template, vars: &RenderVars, doc: &Yaml) -> Result<(), String> {
    let files = doc
        .get("write_files")
        .and_then(Yaml::as_sequence)
        .ok_or("write_files: missing")?;
    for f in files {
        let owner = f.get("owner").and_then(Yaml::as_str).unwrap_or("root");
        let deferred = f.get("defer").and_then(Yaml::as_bool) == Some(true);
        if owner.split(':').any(|o| o == "dev") && !deferred {
            return Err("write_files: a file owned by dev needs defer: true".into());
        }
    }
    let content = |path: &str| {
        files
            .iter()
            .find(|f| f.get("path").and_then(Yaml::as_str) == Some(path))
            .and_then(|f| f.get("content").and_then(Yaml::as_str))
    };
    let tmux = content("/home/dev/.tmux.conf").ok_or("write_files: no /home/dev/.tmux.conf")?;
    if let Some(missing) = TMUX_SETTINGS.iter().find(|s| !tmux.contains(*s)) {
        return Err(format!("/home/dev/.tmux.conf: missing '{missing}'"));
    }
    let variables = merged_variables(t, vars).map_err(|e| e.to_string())?;
    let expected = env_file(&variables);
    if !files
        .iter()
        .any(|f| f.get("content").and_then(Yaml::as_str) == Some(expected.as_str()))
    {
        return Err(
            "write_files: no file holds the environment variables exactly \
                    (content: {{ env_file | tojson }})"
                .into(),
        );
    }
    Ok(())
}

fn check_packages(t: &Template, doc: &Yaml) -> Result<(), String> {
    let packages = strings(doc.get("packages"));
    if let Some(missing) = BASE_PACKAGES.iter().find(|p| !packages.contains(*p)) {
        return Err(format!("packages: missing {missing}"));
    }
    if t.docker && !packages.contains(&"docker.io") {
        return Err("packages: docker: true needs docker.io".into());
    }
    Ok(())
}

fn check_markers(doc: &Yaml) -> Result<(), String> {
    let mut markers = Vec::new();
    let mut in_runcmd = 0;
    for section in ["bootcmd", "runcmd"] {
        let Some(items) = doc.get(section) else {
            continue;
        };
        let items = items
            .as_sequence()
            .ok_or(format!("{section}: must be a list"))?;
        for item in items {
            if let Some(m) = marker_of(item).map_err(|e| format!("{section}: {e}"))? {
                markers.push(m);
                in_runcmd += usize::from(section == "runcmd");
            }
        }
    }
    if in_runcmd == 0 {
        return Err(format!("runcmd: no progress marker ({PROGRESS_PREFIX}...)"));
    }
    let mut last = 0;
    for (percent, phase) in &markers {
        if *percent == 0 || *percent <= last {
            return Err(format!(
                "progress markers must rise within 1..=100: {percent} {phase} after {last}"
            ));
        }
        last = *percent;
    }
    match markers.last() {
        Some((100, phase)) if phase == "ready" => Ok(()),
        _ => Err(format!(
            "the last progress marker must be '{PROGRESS_PREFIX}100 ready'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ubuntu() -> Template {
        builtin()
            .into_iter()
            .find(|t| t.name == "ubuntu")
            .expect("ubuntu template")
    }

    /// The ubuntu template with `from` replaced by `to` in its user-data.
    fn edited(from: &str, to: &str) -> Template {
        let mut t = ubuntu();
        assert!(t.user_data.contains(from), "{from:?} not in the template");
        t.user_data = t.user_data.replacen(from, to, 1);
        t
    }

    fn yaml(text: &str) -> Yaml {
        serde_norway::from_str(text).expect("rendered YAML")
    }

    fn file_content(doc: &Yaml, path: &str) -> String {
        doc.get("write_files")
            .and_then(Yaml::as_sequence)
            .and_then(|f| {
                f.iter()
                    .find(|f| f.get("path").and_then(Yaml::as_str) == Some(path))
            })
            .and_then(|f| f.get("content").and_then(Yaml::as_str))
            .expect("file in write_files")
            .to_string()
    }

    fn top_keys(doc: &Yaml) -> Vec<String> {
        doc.as_mapping()
            .expect("mapping")
            .keys()
            .map(|k| k.as_str().expect("string key").to_string())
            .collect()
    }

    const ENV_FILE: &str = "/etc/profile.d/devpocket-env.sh";

    #[test]
    fn every_builtin_template_parses_and_validates() {
        let all = builtin();
        let names: Vec<&str> = all.iter().map(Template::id).collect();
        assert_eq!(
            names,
            [
                "ubuntu",
                "python",
                "nodejs",
                "golang",
                "rust",
                "coding-agent"
            ]
        );
        for (file, text) in BUILTIN {
            let t = parse(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(t.name, file, "name must equal the file name");
            let size = check(&t).unwrap_or_else(|e| panic!("{e}"));
            assert!(size > 1000 && size <= MAX_USER_DATA, "{file}: {size}");
        }
    }

    #[test]
    fn builtin_templates_match_their_docker_flag() {
        for t in builtin() {
            let doc = yaml(&render(&t, &sample_vars()).expect("render"));
            let packages = strings(doc.get("packages"));
            assert_eq!(packages.contains(&"docker.io"), t.docker, "{}", t.name);
            assert_eq!(
                t.installed_tools.iter().any(|s| s == "docker"),
                t.docker,
                "{}",
                t.name
            );
        }
    }

    #[test]
    fn render_puts_in_the_hash_keys_and_variables_but_never_the_password() {
        let t = ubuntu();
        let mut vars = sample_vars();
        let password = "Correct-Horse-42";
        vars.dev_password_hash = hash_password(password).expect("hash");
        vars.environment_variables =
            BTreeMap::from([("API_TOKEN".to_string(), "s3cr3t value".to_string())]);
        let text = render(&t, &vars).expect("render");
        assert!(!text.contains(password));
        let doc = yaml(&text);
        let dev = &doc["users"][0];
        assert_eq!(dev["name"].as_str(), Some("dev"));
        assert_eq!(
            dev["passwd"].as_str(),
            Some(vars.dev_password_hash.as_str())
        );
        assert_eq!(dev["lock_passwd"].as_bool(), Some(false));
        assert_eq!(
            dev["ssh_authorized_keys"][0].as_str(),
            Some(vars.ssh_authorized_key.as_str())
        );
        assert_eq!(
            doc["ssh_keys"]["ed25519_private"].as_str(),
            Some(format!("{}\n", vars.host_key_private.trim_end()).as_str())
        );
        assert_eq!(
            doc["ssh_keys"]["ed25519_public"].as_str(),
            Some(vars.host_key_public.trim())
        );
        assert_eq!(doc["hostname"].as_str(), Some("devpocket-sample"));
        let env = file_content(&doc, ENV_FILE);
        assert!(env.contains("export API_TOKEN='s3cr3t value'\n"), "{env}");
        // the template's defaults stay unless overridden
        assert!(env.contains("export EDITOR='vim'\n"), "{env}");
        vars.environment_variables
            .insert("EDITOR".into(), "nano".into());
        let env = file_content(&yaml(&render(&t, &vars).expect("render")), ENV_FILE);
        assert!(
            env.contains("export EDITOR='nano'\n") && !env.contains("'vim'"),
            "{env}"
        );
    }

    const HOSTILE: [&str; 9] = [
        SAMPLE_HOSTILE_VALUE,
        "\"\nruncmd: [reboot]\n\"",
        "'; reboot; echo '",
        "#cloud-config\nusers: []",
        "x\n  ssh_pwauth: true\ndevpocket_injected: 1",
        "\\\"\\n\\u0041 {{ hostname }} {% raw %}",
        "- a\n- b\n---\nnew: doc\n...",
        "\u{85}\u{2028}\u{2029}\u{7f}\u{9f}\u{feff}\u{fffe}\u{ffff} é 漢 🙂",
        "",
    ];

    #[test]
    fn hostile_variable_values_stay_plain_strings() {
        let t = ubuntu();
        let mut vars = sample_vars();
        vars.environment_variables.clear();
        let benign_keys = top_keys(&yaml(&render(&t, &vars).expect("render")));
        for value in HOSTILE {
            vars.environment_variables = BTreeMap::from([("HOSTILE".to_string(), value.into())]);
            let text = render(&t, &vars).expect("render");
            let doc = yaml(&text);
            assert_eq!(
                top_keys(&doc),
                benign_keys,
                "{value:?} changed the document"
            );
            let env = file_content(&doc, ENV_FILE);
            let line = format!("export HOSTILE={}\n", shell_quote(value));
            assert!(env.contains(&line), "{value:?} did not round-trip:\n{env}");
            assert_eq!(
                doc["users"][0]["passwd"].as_str(),
                Some(SAMPLE_PASSWORD_HASH)
            );
        }
    }

    #[test]
    fn the_env_file_gives_a_shell_the_exact_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, value) in HOSTILE.iter().enumerate() {
            let vars = BTreeMap::from([("HOSTILE".to_string(), value.to_string())]);
            let path = dir.path().join(format!("env{i}.sh"));
            std::fs::write(&path, env_file(&vars)).expect("write");
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(r#". "$1" && printf %s "$HOSTILE""#)
                .arg("sh")
                .arg(&path)
                .output()
                .expect("run sh");
            assert!(out.status.success(), "{value:?}");
            assert_eq!(String::from_utf8_lossy(&out.stdout), *value);
        }
    }

    #[test]
    fn tojson_output_is_ascii_safe_for_yaml_1_1() {
        let out =
            yaml_safe(&serde_json::to_string("a\u{85}b\u{2028}\u{7f}\u{feff}é").expect("json"));
        assert_eq!(out, r#""a\u0085b\u2028\u007f\ufeffé""#);
        let back: String = serde_json::from_str(&out).expect("still JSON");
        assert_eq!(back, "a\u{85}b\u{2028}\u{7f}\u{feff}é");
    }

    #[test]
    fn bad_variable_names_are_input_errors() {
        let t = ubuntu();
        for name in ["1ABC", "A-B", "", "A B", "ÄB", "A\nB", "A=B", "A;reboot"] {
            let mut vars = sample_vars();
            vars.environment_variables.insert(name.into(), "x".into());
            let err = render(&t, &vars).expect_err(name);
            assert!(
                matches!(err, TemplateError::VariableName { .. }) && err.is_input_error(),
                "{name:?}: {err}"
            );
            assert!(err.to_string().starts_with("ubuntu: "), "{err}");
        }
        for name in ["A", "_", "a_b", "PATH", "X1", "_1"] {
            assert!(valid_variable_name(name), "{name}");
        }
        let mut vars = sample_vars();
        vars.environment_variables
            .insert("NUL".into(), "a\0b".into());
        assert!(matches!(
            render(&t, &vars),
            Err(TemplateError::VariableValue { .. })
        ));
    }

    #[test]
    fn shipped_templates_stay_well_within_the_fuel() {
        let vars = sample_vars();
        for t in builtin() {
            render_with_fuel(&t, &vars, RENDER_FUEL / 10)
                .unwrap_or_else(|e| panic!("{} needs over a tenth of RENDER_FUEL: {e}", t.name));
        }
    }

    #[test]
    fn runaway_templates_are_refused() {
        for body in [
            "{% for i in range(100000000) %}x{% endfor %}",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        ] {
            let t = edited("#cloud-config\n", &format!("#cloud-config\n{body}\n"));
            let err = validate(&t).expect_err(body);
            assert!(matches!(err, TemplateError::Render { .. }), "{body}: {err}");
            assert!(!err.is_input_error());
        }
        // Output that expands past the limit stops at it instead of filling memory.
        let t = edited(
            "#cloud-config\n",
            "#cloud-config\n{% for i in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}\n",
        );
        let err = validate(&t).expect_err("too large");
        assert!(
            matches!(err, TemplateError::TooLarge { size, .. } if size == MAX_USER_DATA + 1),
            "{err}"
        );
    }

    #[test]
    fn oversize_user_data_is_an_error() {
        let t = ubuntu();
        let mut vars = sample_vars();
        vars.environment_variables
            .insert("BIG".into(), "x".repeat(MAX_USER_DATA));
        let err = render(&t, &vars).expect_err("too large");
        assert!(
            matches!(err, TemplateError::TooLarge { size, limit, .. } if size > limit && limit == MAX_USER_DATA),
            "{err}"
        );
        assert!(err.is_input_error());
        vars.environment_variables
            .insert("BIG".into(), "x".repeat(MAX_USER_DATA / 2));
        assert!(render(&t, &vars).is_ok());
    }

    #[test]
    fn hash_password_is_sha512_crypt_with_a_random_salt() {
        let a = hash_password("Correct-Horse-42").expect("hash");
        let b = hash_password("Correct-Horse-42").expect("hash");
        assert!(a.starts_with("$6$"), "{a}");
        assert_ne!(a, b, "salt must be random");
        assert!(sha_crypt::sha512_check("Correct-Horse-42", &a).is_ok());
        assert!(sha_crypt::sha512_check("wrong", &a).is_err());
        assert!(sha_crypt::sha512_check(SAMPLE_PASSWORD, SAMPLE_PASSWORD_HASH).is_ok());
    }

    #[test]
    fn render_refuses_malformed_server_values() {
        let t = ubuntu();
        type Edit = fn(&mut RenderVars);
        let cases: [(&str, Edit); 6] = [
            ("plain password", |v| v.dev_password_hash = "hunter2".into()),
            ("bad hostname", |v| v.hostname = "my_env\nx: y".into()),
            ("two-line key", |v| {
                v.ssh_authorized_key.push_str("\nssh-rsa AAAA x")
            }),
            ("bad pem", |v| {
                v.host_key_private = v.host_key_private.replacen("\n", "\nruncmd: [reboot]\n", 2)
            }),
            ("rsa host key", |v| {
                v.host_key_public = "ssh-rsa AAAA host".into()
            }),
            ("crlf pem", |v| {
                v.host_key_private = v.host_key_private.replace('\n', "\r\n")
            }),
        ];
        for (what, edit) in cases {
            let mut vars = sample_vars();
            edit(&mut vars);
            let err = render(&t, &vars).expect_err(what);
            assert!(
                matches!(err, TemplateError::Invalid { .. }) && !err.is_input_error(),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn validate_rejects_templates_that_break_the_rules() {
        let cases = [
            (
                "content: {{ env_file | tojson }}",
                "content: {{ env_file }}",
                "not YAML",
            ),
            (
                "passwd: {{ dev_password_hash | tojson }}",
                "passwd: \"x\"",
                "passwd",
            ),
            ("lock_passwd: false", "lock_passwd: true", "lock_passwd"),
            ("shell: /bin/bash\n", "shell: /bin/sh\n", "shell"),
            ("groups: [adm, docker]", "groups: [docker]", "include adm"),
            ("groups: [adm, docker]", "groups: [adm]", "include docker"),
            (
                "ssh_genkeytypes: [ed25519]",
                "ssh_genkeytypes: [ed25519, rsa]",
                "ssh_genkeytypes",
            ),
            (
                "owner: dev:dev\n    permissions: \"0644\"\n    defer: true\n",
                "owner: dev:dev\n",
                "defer: true",
            ),
            ("set -g mouse on\n", "\n", "mouse on"),
            ("  - tmux\n", "", "missing tmux"),
            ("  - docker.io\n", "", "docker.io"),
            (
                "'echo \"devpocket-progress: 100 ready\"'",
                "'echo done'",
                "100 ready",
            ),
            (
                "'echo \"devpocket-progress: 100 ready\"'",
                "echo \"devpocket-progress: 100 ready\"",
                "neither a string nor a list",
            ),
            (
                "'echo \"devpocket-progress: 100 ready\"'",
                "'echo \"devpocket-progress: 100 done\"'",
                "100 ready",
            ),
            (
                "'echo \"devpocket-progress: 80 configuring\"'",
                "'echo \"devpocket-progress: 5 configuring\"'",
                "must rise",
            ),
            (
                "'echo \"devpocket-progress: 80 configuring\"'",
                "'echo devpocket-progress: 80 configuring'",
                "not in the form",
            ),
            ("#cloud-config\n", "#!/bin/sh\n", "#cloud-config"),
            (
                "{{ hostname | tojson }}",
                "{{ hostnme | tojson }}",
                "undefined",
            ),
            (
                "{{ hostname | tojson }}",
                "{{ hostname | tojson }",
                "syntax error",
            ),
            (
                "ed25519_public: {{ host_key_public | tojson }}",
                "ed25519_public: x",
                "ed25519_public",
            ),
        ];
        for (from, to, expected) in cases {
            let err = validate(&edited(from, to)).expect_err(to).to_string();
            assert!(
                err.starts_with("ubuntu: ") && err.contains(expected),
                "{to:?}: {err}"
            );
        }
        let mut t = ubuntu();
        t.name = "Ubuntu".into();
        assert!(validate(&t).is_err());
        let mut t = ubuntu();
        t.display_name = " ".into();
        assert!(validate(&t).is_err());
        let mut t = ubuntu();
        t.local_setup.push("sudo apt-get install x".into());
        assert!(validate(&t).is_err());
        let mut t = ubuntu();
        t.default_resources.memory = "4".into();
        assert!(validate(&t).is_err());
        let mut t = ubuntu();
        t.user_data
            .push_str(&format!("# {}\n", "x".repeat(MAX_USER_DATA)));
        assert!(matches!(validate(&t), Err(TemplateError::TooLarge { .. })));
    }

    #[test]
    fn parse_errors_name_the_template() {
        let err = parse("name: broken\ndisplay_name: [\n").expect_err("syntax");
        assert!(err.to_string().starts_with("template: "), "{err}");
        let err = parse("name: broken\ndisplay_name: B\n").expect_err("fields");
        assert!(err.to_string().starts_with("broken: "), "{err}");
        let mut text = BUILTIN[0].1.to_string();
        text.push_str("unknown_field: 1\n");
        assert!(parse(&text).is_err(), "unknown fields are refused");
    }

    #[test]
    fn progress_lines_parse() {
        assert_eq!(
            parse_progress("devpocket-progress: 40 toolchain"),
            Some((40, "toolchain"))
        );
        assert_eq!(
            parse_progress("  devpocket-progress: 100 ready\r"),
            Some((100, "ready"))
        );
        assert_eq!(
            parse_progress("devpocket-progress: 60 coding agents"),
            Some((60, "coding agents"))
        );
        for bad in [
            "devpocket-progress: 101 over",
            "devpocket-progress: 40",
            "devpocket-progress: x toolchain",
            "devpocket-progress: -1 back",
            "progress: 40 toolchain",
            "devpocket-progress: 40 Toolchain!",
        ] {
            assert_eq!(parse_progress(bad), None, "{bad}");
        }
    }

    #[test]
    fn resources_read_as_quantities() {
        let r = |cpu: &str, memory: &str, storage: &str| Resources {
            cpu: cpu.into(),
            memory: memory.into(),
            storage: storage.into(),
        };
        let ok = r("2", "4Gi", "50Gi");
        assert_eq!(
            (ok.cpu_millis(), ok.memory_mib(), ok.storage_gib()),
            (Some(2000), Some(4096), Some(50))
        );
        let small = r("500m", "512Mi", "1Ti");
        assert_eq!(
            (small.cpu_millis(), small.memory_mib(), small.storage_gib()),
            (Some(500), Some(512), Some(1024))
        );
        let bad = r("two", "4", "50GB");
        assert_eq!(
            (bad.cpu_millis(), bad.memory_mib(), bad.storage_gib()),
            (None, None, None)
        );
        assert_eq!(r("0", "0Gi", "-1Gi").cpu_millis(), None);
        let parsed: Resources =
            serde_norway::from_str("cpu: 2\nmemory: 4Gi\nstorage: 50Gi\n").expect("numbers");
        assert_eq!(parsed, ok);
    }

    #[test]
    fn hostnames_come_from_environment_names() {
        assert_eq!(hostname_for("My_Env"), "my-env");
        assert_eq!(hostname_for("-api-"), "api");
        assert_eq!(hostname_for("__"), "devpocket");
        assert_eq!(hostname_for(&"a".repeat(80)).len(), 63);
        for name in ["My_Env", "x", "a-b-c_", "ÄÖ"] {
            assert!(valid_hostname(&hostname_for(name)), "{name}");
        }
        assert!(!valid_hostname("a_b") && !valid_hostname("-a") && !valid_hostname(""));
    }

    #[test]
    fn api_view_lists_the_api_fields_only() {
        let view = ubuntu().api_view();
        let keys: Vec<&str> = view
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "id",
            "name",
            "display_name",
            "description",
            "category",
            "tags",
            "default_resources",
            "environment_variables",
            "installed_tools",
            "status",
            "version",
            "documentation_url",
            "icon_url",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(view["id"], "ubuntu");
        assert_eq!(view["default_resources"]["memory"], "4Gi");
    }

    #[test]
    fn directories_add_and_override_templates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut python = BUILTIN[1]
            .1
            .replace("display_name: Python", "display_name: My Python");
        std::fs::write(dir.path().join("python.yaml"), &python).expect("write");
        python = python.replace("name: python", "name: extra");
        std::fs::write(dir.path().join("extra.yml"), &python).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "not a template").expect("write");
        let all = catalog(Some(dir.path())).expect("catalog");
        assert_eq!(all.len(), 7);
        assert_eq!(all[1].display_name, "My Python");
        assert_eq!(all[6].name, "extra");

        std::fs::write(dir.path().join("wrong.yaml"), &python).expect("write");
        let err = load_dir(dir.path()).expect_err("name differs from file");
        assert!(err.to_string().contains("wrong.yaml"), "{err}");
        let each = load_dir_each(dir.path()).expect("dir");
        assert_eq!(each.iter().filter(|(_, t)| t.is_err()).count(), 1);
        assert!(load_dir(&dir.path().join("missing")).is_err());
    }
}
