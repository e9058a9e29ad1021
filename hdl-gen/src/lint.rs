//! Runners for the external tools: `verilator --lint-only -Wall` and
//! yosys `synth_xilinx`, with their output parsed into structs.

use crate::print::WrittenDesign;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::process::Command;

/// Failure to run an external tool (not: the tool found problems).
#[derive(Debug)]
pub enum ToolError {
    /// The executable is not on `PATH`.
    NotFound {
        /// Executable name.
        tool: &'static str,
    },
    /// Spawning or file I/O failed.
    Io(String),
    /// The tool ran but failed without producing a usable result.
    Failed {
        /// Executable name.
        tool: &'static str,
        /// Exit status and output.
        detail: String,
    },
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolError::NotFound { tool } => write!(
                f,
                "{tool} not found on PATH: install it with apt-get install {tool}"
            ),
            ToolError::Io(e) => write!(f, "{e}"),
            ToolError::Failed { tool, detail } => write!(f, "{tool} failed: {detail}"),
        }
    }
}

impl std::error::Error for ToolError {}

fn run(tool: &'static str, args: &[&str], dir: &Path) -> Result<std::process::Output, ToolError> {
    match Command::new(tool).args(args).current_dir(dir).output() {
        Ok(o) => Ok(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ToolError::NotFound { tool }),
        Err(e) => Err(ToolError::Io(format!("running {tool}: {e}"))),
    }
}

/// Severity of a Verilator message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// `%Warning-CODE`
    Warning,
    /// `%Error` (syntax, undeclared, ...)
    Error,
}

/// One Verilator message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LintMessage {
    /// Warning or error.
    pub severity: Severity,
    /// Warning code such as `WIDTHEXPAND` (empty for plain errors).
    pub code: String,
    /// Source file, when given.
    pub file: String,
    /// Line, when given (0 otherwise).
    pub line: u32,
    /// Message text.
    pub text: String,
}

impl fmt::Display for LintMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(
            f,
            "{sev} {} {}:{}: {}",
            self.code, self.file, self.line, self.text
        )
    }
}

/// Result of a lint run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LintReport {
    /// Parsed messages (the final "Exiting due to ..." line is dropped).
    pub messages: Vec<LintMessage>,
    /// Verilator's exit status was success.
    pub success: bool,
    /// Raw stderr, for reports.
    pub raw: String,
}

impl LintReport {
    /// No messages and a successful exit.
    pub fn is_clean(&self) -> bool {
        self.success && self.messages.is_empty()
    }
    /// Warnings only.
    pub fn warnings(&self) -> impl Iterator<Item = &LintMessage> {
        self.messages
            .iter()
            .filter(|m| m.severity == Severity::Warning)
    }
}

/// Parse Verilator's stderr. Continuation lines (source excerpts, hints)
/// are skipped.
pub fn parse_verilator(stderr: &str) -> Vec<LintMessage> {
    let mut out = Vec::new();
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix('%') else {
            continue;
        };
        let (head, tail) = match rest.split_once(": ") {
            Some(x) => x,
            None => (rest, ""),
        };
        let (severity, code) = if let Some(c) = head.strip_prefix("Warning-") {
            (Severity::Warning, c.to_string())
        } else if let Some(c) = head.strip_prefix("Error-") {
            (Severity::Error, c.to_string())
        } else if head == "Error" {
            (Severity::Error, String::new())
        } else if head == "Warning" {
            (Severity::Warning, String::new())
        } else {
            continue;
        };
        if tail.starts_with("Exiting due to") {
            continue;
        }
        // tail: "file.v:12:5: message" or just "message"
        let mut file = String::new();
        let mut lineno = 0;
        let mut text = tail.to_string();
        let parts: Vec<&str> = tail.splitn(4, ':').collect();
        if parts.len() == 4 {
            if let (Ok(l), Ok(_)) = (parts[1].parse::<u32>(), parts[2].parse::<u32>()) {
                file = parts[0].to_string();
                lineno = l;
                text = parts[3].trim().to_string();
            }
        }
        out.push(LintMessage {
            severity,
            code,
            file,
            line: lineno,
            text,
        });
    }
    out
}

/// Run `verilator --lint-only -Wall +1364-2001ext+v` on a written design.
pub fn verilator_lint(design: &WrittenDesign) -> Result<LintReport, ToolError> {
    let f = design
        .filelist
        .file_name()
        .and_then(|s| s.to_str())
        .ok_or_else(|| ToolError::Io("bad file list path".to_string()))?
        .to_string();
    let out = run(
        "verilator",
        &[
            "--lint-only",
            "-Wall",
            // Parse .v files as Verilog-2001, the language we promise.
            "+1364-2001ext+v",
            "--top-module",
            &design.top,
            "-f",
            &f,
        ],
        &design.dir,
    )?;
    let raw = String::from_utf8_lossy(&out.stderr).into_owned();
    let messages = parse_verilator(&raw);
    if !out.status.success() && messages.is_empty() {
        return Err(ToolError::Failed {
            tool: "verilator",
            detail: format!("{}: {raw}", out.status),
        });
    }
    Ok(LintReport {
        messages,
        success: out.status.success(),
        raw,
    })
}

/// Xilinx family for yosys `synth_xilinx -family` (yosys 0.23 supports
/// xcup, xcu, xc7, xc6s, xc6v, and older experimental ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// UltraScale+ (`xcup`): DSP48E2, RAMB18E2/RAMB36E2, URAM288.
    UltraScalePlus,
    /// UltraScale (`xcu`).
    UltraScale,
    /// 7 series (`xc7`): DSP48E1, RAMB18E1/RAMB36E1.
    Series7,
}

impl Family {
    /// The yosys family name.
    pub fn yosys_name(self) -> &'static str {
        match self {
            Family::UltraScalePlus => "xcup",
            Family::UltraScale => "xcu",
            Family::Series7 => "xc7",
        }
    }
}

/// Cell counts from the final `stat` of a yosys synthesis.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SynthStats {
    /// Every cell type with its count, e.g. `LUT4 -> 12`, `FDRE -> 8`.
    pub cells: BTreeMap<String, u64>,
    /// Total number of cells.
    pub total_cells: u64,
}

impl SynthStats {
    fn sum(&self, pred: impl Fn(&str) -> bool) -> u64 {
        self.cells
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(_, v)| v)
            .sum()
    }
    /// LUT1..LUT6 (LUT6_2 counted as one).
    pub fn luts(&self) -> u64 {
        self.sum(|k| k.starts_with("LUT"))
    }
    /// Flip-flops: FDRE, FDSE, FDCE, FDPE and their inverted-clock variants.
    pub fn ffs(&self) -> u64 {
        self.sum(|k| k.starts_with("FD"))
    }
    /// DSP48E1/DSP48E2.
    pub fn dsps(&self) -> u64 {
        self.sum(|k| k.starts_with("DSP48"))
    }
    /// Block RAMs: RAMB18*/RAMB36* primitives.
    pub fn brams(&self) -> u64 {
        self.sum(|k| k.starts_with("RAMB"))
    }
    /// UltraRAMs (URAM288).
    pub fn urams(&self) -> u64 {
        self.sum(|k| k.starts_with("URAM"))
    }
    /// Distributed RAM primitives (RAM32M, RAM64X1D, ...).
    pub fn lutrams(&self) -> u64 {
        self.sum(|k| k.starts_with("RAM") && !k.starts_with("RAMB"))
    }
    /// Carry chains (CARRY4/CARRY8).
    pub fn carries(&self) -> u64 {
        self.sum(|k| k.starts_with("CARRY"))
    }
}

/// Parse the last `stat` block of a yosys log: the "Number of cells:" total
/// and the indented `CELLTYPE count` lines after it.
pub fn parse_yosys_stat(log: &str) -> Option<SynthStats> {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .rposition(|l| l.trim_start().starts_with("Number of cells:"))?;
    let total = lines[start].split(':').nth(1)?.trim().parse::<u64>().ok()?;
    let mut stats = SynthStats {
        cells: BTreeMap::new(),
        total_cells: total,
    };
    for l in &lines[start + 1..] {
        let mut it = l.split_whitespace();
        let (Some(name), Some(count), None) = (it.next(), it.next(), it.next()) else {
            break;
        };
        let Ok(n) = count.parse::<u64>() else {
            break;
        };
        stats.cells.insert(name.to_string(), n);
    }
    Some(stats)
}

/// Options for [`yosys_synth`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthOptions {
    /// Target family.
    pub family: Family,
    /// Out-of-context estimate: no I/O buffers, no clock buffer
    /// (`-noiopad -noclkbuf`), so the counts are the module's own logic.
    pub out_of_context: bool,
    /// Flatten the hierarchy first (`-flatten`). Without it every module is synthesised
    /// once (the R x C instances of `tessera_pe` share one netlist) and `stat -top` sums the
    /// cells by instance count: minutes instead of hours for a 2,048-PE engine, at the price of
    /// no optimisation across module boundaries (tiny: +6% LUT, +8% FF, same DSP and BRAM;
    /// docs/engine.md "Synthesis").
    pub flatten: bool,
}

impl SynthOptions {
    /// UltraScale+, out of context, hierarchical: the method that finishes for every preset.
    #[must_use]
    pub fn hierarchical(family: Family) -> SynthOptions {
        SynthOptions {
            family,
            out_of_context: true,
            flatten: false,
        }
    }

    /// One line naming the method, printed with every report.
    #[must_use]
    pub fn describe(&self) -> String {
        format!(
            "yosys synth_xilinx -family {}{}",
            self.family.yosys_name(),
            if self.flatten {
                " -flatten (flat)"
            } else {
                " (hierarchical: each module synthesised once, totals by instance count)"
            }
        )
    }
}

impl Default for SynthOptions {
    /// UltraScale+, out of context, flattened.
    fn default() -> SynthOptions {
        SynthOptions {
            family: Family::UltraScalePlus,
            out_of_context: true,
            flatten: true,
        }
    }
}

/// Run `yosys` `synth_xilinx -family <family> -top <top>` on a written
/// design and parse the final `stat -top` (whole-design totals, hierarchical or flat). The script and the full log are left
/// in the design directory as `<top>_synth.ys` / `<top>_synth.log`.
pub fn yosys_synth(design: &WrittenDesign, opts: &SynthOptions) -> Result<SynthStats, ToolError> {
    let mut script = String::new();
    for f in &design.files {
        let name = f
            .file_name()
            .and_then(|s| s.to_str())
            .ok_or_else(|| ToolError::Io("bad file path".to_string()))?;
        script.push_str(&format!("read_verilog {name}\n"));
    }
    let mut flags = String::new();
    if opts.out_of_context {
        flags.push_str(" -noiopad -noclkbuf");
    }
    if opts.flatten {
        flags.push_str(" -flatten");
    }
    // `stat -top` adds the "design hierarchy" block: the whole design's cells, each
    // submodule's counted once per instance (the last stat block, which the parser reads).
    script.push_str(&format!(
        "synth_xilinx -family {}{flags} -top {top}\nstat -top {top}\n",
        opts.family.yosys_name(),
        top = design.top
    ));
    let script_name = format!("{}_synth.ys", design.top);
    std::fs::write(design.dir.join(&script_name), &script)
        .map_err(|e| ToolError::Io(format!("writing yosys script: {e}")))?;
    let log_name = format!("{}_synth.log", design.top);
    let out = run(
        "yosys",
        &["-q", "-l", &log_name, "-s", &script_name],
        &design.dir,
    )?;
    let log = std::fs::read_to_string(design.dir.join(&log_name)).unwrap_or_default();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(ToolError::Failed {
            tool: "yosys",
            detail: format!("{}: {stderr}", out.status),
        });
    }
    parse_yosys_stat(&log).ok_or_else(|| ToolError::Failed {
        tool: "yosys",
        detail: "no stat block in the log".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_message_is_one_clear_line() {
        let e = run("tessera-no-such-tool", &[], Path::new(".")).expect_err("missing");
        assert!(matches!(e, ToolError::NotFound { .. }));
        let e = ToolError::NotFound { tool: "verilator" };
        assert_eq!(
            e.to_string(),
            "verilator not found on PATH: install it with apt-get install verilator"
        );
    }

    #[test]
    fn parses_verilator_messages() {
        let stderr = "\
%Warning-WIDTHEXPAND: t.v:14:16: Operator ASSIGNW expects 9 bits on the Assign RHS, but Assign RHS's ADD generates 8 bits.
                                : ... In instance t
   14 |   assign y_o = a_i + b_i;
      |                ^
                      ... For warning description see https://verilator.org/warn/WIDTHEXPAND?v=5.006
%Warning-UNUSEDSIGNAL: t.v:3:23: Signal is not used: 'c_i'
%Error: t.v:20:1: syntax error, unexpected endmodule
%Error: Exiting due to 2 warning(s)
";
        let m = parse_verilator(stderr);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].severity, Severity::Warning);
        assert_eq!(m[0].code, "WIDTHEXPAND");
        assert_eq!((m[0].file.as_str(), m[0].line), ("t.v", 14));
        assert!(m[0].text.starts_with("Operator ASSIGNW expects 9 bits"));
        assert_eq!(m[1].code, "UNUSEDSIGNAL");
        assert_eq!(m[2].severity, Severity::Error);
        assert_eq!(m[2].code, "");
        assert_eq!(m[2].line, 20);
    }

    #[test]
    fn parses_last_yosys_stat() {
        let log = "\
=== mac ===

   Number of wires:                 50
   Number of cells:                  5
     FDRE                            2
     LUT2                            3

=== design hierarchy ===

   Number of cells:                 12
     CARRY4                          1
     DSP48E2                         1
     FDRE                            4
     FDSE                            1
     LUT1                            1
     LUT6                            2
     RAMB18E2                        1
     RAMB36E2                        1

End of script.
";
        let s = parse_yosys_stat(log).expect("stat");
        assert_eq!(s.total_cells, 12);
        assert_eq!(s.luts(), 3);
        assert_eq!(s.ffs(), 5);
        assert_eq!(s.dsps(), 1);
        assert_eq!(s.brams(), 2);
        assert_eq!(s.carries(), 1);
        assert_eq!(s.urams(), 0);
        assert!(parse_yosys_stat("nothing").is_none());
    }
}
