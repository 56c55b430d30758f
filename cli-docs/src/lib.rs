//! Man pages and shell completions, generated from a binary's clap definition so that they
//! always say what the binary accepts (the packages ship what this writes).
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// Why the documentation could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    /// A directory or file under the output directory could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// What was being written.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Writes `man/<name>.1` (and one page per visible subcommand, `<name>-<sub>.1`) and
/// `completions/{bash,zsh,fish}/` files for `cmd` under `dir`, creating the folders.
/// Completion file names are the ones bash-completion, zsh and fish load on their own:
/// `<name>`, `_<name>` and `<name>.fish`.
pub fn write(mut cmd: clap::Command, dir: &Path) -> Result<(), DocsError> {
    let name = cmd.get_name().to_string();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DocsError::Write { path, source }
    };
    let man = dir.join("man");
    std::fs::create_dir_all(&man).map_err(io(&man))?;
    clap_mangen::generate_to(cmd.clone(), &man).map_err(io(&man))?;
    for (shell, file) in [
        (Shell::Bash, name.clone()),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let folder = dir.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&folder).map_err(io(&folder))?;
        let path = folder.join(file);
        let mut out = std::fs::File::create(&path).map_err(io(&path))?;
        clap_complete::generate(shell, &mut cmd, &name, &mut out);
    }
    Ok(())
}
