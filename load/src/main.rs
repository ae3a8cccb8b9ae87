//! tern-load: see the module docs in the files this binary is built from.

fn main() {
    eprintln!("tern-load: not built yet");
    std::process::exit(2);
}
