//! Architecture-specific machine set-up. moat runs x86_64 guests only.

pub mod x86_64;
