"""COCO caption tokenisation in pure Python: pycocoevalcap's `PTBTokenizer` without Java.

What pycocoevalcap 1.2 does (`pycocoevalcap/tokenizer/ptbtokenizer.py`), and therefore what every
published COCO CIDEr number was computed on:

1. join every caption of every image into one text, one caption per line
   (`'\\n'.join(c['caption'].replace('\\n', ' ') ...)`), in the dict's image order;
2. run Stanford CoreNLP 3.4.1's `edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`
   over that text (a JFlex lexer: longest match wins, ties go to the earlier rule; trailing context
   counts towards the length; it may look across line ends);
3. split each output line on `' '` and drop the tokens in `PUNCTUATIONS`.

This module re-implements step 2 as a longest-match lexer over the same rules (written from
CoreNLP's `PTBLexer.flex` and checked token by token against the 3.4.1 jar that pycocoevalcap
ships), with the options the command line gives: `ptb3Escaping` defaults (brackets become
`-LRB-`/`-RRB-`/`-LCB-`/`-RCB-`/`-LSB-`/`-RSB-`, LaTeX quotes, `...` ellipses, `--` dashes, currency
and fractions normalised, spaces inside a token become U+00A0), no Americanisation, no escaping of
`/` and `*`, assimilations split (`cannot` -> `can not`, `gonna` -> `gon na`), untokenizable
characters deleted (e.g. emoji), then every token lower-cased.

Quirks of the official pipeline that are reproduced on purpose (they change CIDEr):
- lower-casing happens after bracket normalisation, so `(`/`)` become `-lrb-`/`-rrb-`, which are
  NOT in `PUNCTUATIONS` (upper-case there) and stay in the caption as words;
- `?!`, `!!`, `$`, `%`, `&`, `#`, `/` and similar tokens are not in `PUNCTUATIONS` and stay too;
- tokens may contain U+00A0 (`3 1/2` -> `3\\xa01/2`); pycocoevalcap splits on `' '` only, but the
  CIDEr scorer splits on any whitespace, so such a token counts as two words there;
- context crosses caption boundaries: `etc.` at the end of one caption followed by a caption that
  starts with a capital letter gives `etc. .` (the extra `.` is then removed as punctuation).

Known differences from the jar (none seen on English captions):
- `\r`, U+2028, U+2029, U+000B and U+000C inside a caption end a line in the jar, which shifts
  every later caption onto the wrong image in pycocoevalcap; here they are read as spaces;
- letter/digit classes come from the `regex` module's Unicode tables, not from the JDK the jar was
  generated with, so letters added to Unicode since then may lex differently;
- the 3.4.1 grammar itself is not published; the rules here were reconstructed from the
  PTBLexer.flex copies older and newer than it (a ~2013 fork and CoreNLP 2017) and settled rule by rule
  against the jar (abbreviation lists, FILENAME, EMAIL, LIKELYURL's accidental `,-_` range, the
  ASIANSMILEY typo, ...). tests/unit/test_eval_parity.py compares with the jar on every run; when
  this was written, 276,000 generated lines (word-level and character-level fuzz over quotes,
  abbreviations, URLs, numbers, contractions, blank lines, Unicode, emoji) tokenised identically.
Characters beyond U+FFFF are lexed as the jar lexes them, as two UTF-16 surrogates (an emoji is
two untokenizable units, deleted).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import regex

__all__ = ["PUNCTUATIONS", "ptb_tokenize", "tokenize_captions", "tokenize_lines"]

#: pycocoevalcap 1.2 `tokenizer/ptbtokenizer.py`: "punctuations to be removed from the sentences".
PUNCTUATIONS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                ".", "?", "!", ",", ":", "-", "--", "...", ";")
_PUNCTUATION_SET = frozenset(PUNCTUATIONS)

# --------------------------------------------------------------------------------------------
# Macros (PTBLexer.flex). The lexer is `%caseless`: literal letters match either case but
# character classes do not ("[A] only matches A"); `_caseless` rewrites each literal letter
# outside a class as `[xX]` when a rule is compiled. (IGNORECASE with scoped `(?-i:...)` classes
# would say the same, but the `regex` module mis-matches some such alternations.)
# --------------------------------------------------------------------------------------------
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_SPACES = _SPACE + "+"
_NEWLINE = r"(?:\r\n|\r|\n|\u2028|\u2029|\u000B|\u000C|\u0085)"
_SPACENL = f"(?:{_SPACE}|{_NEWLINE})"
_SPACENLS = _SPACENL + "+"
# SGML-like tags (never across a line end in 3.4.1).
_SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
         r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^'\r\n]*'|\"[^\"\r\n]*\"|[A-Za-z][A-Za-z0-9_:.\-]*)))*[ ]*/?"
         r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
_SENTEND = f"{_SPACENL}(?:{_SPACENL}|\\p{{Lu}}|{_SGML})"
_DIGIT = r"(?:\p{Nd}|[\u07C0-\u07C9])"
_DATE = f"{_DIGIT}{{1,2}}[\\-/]{_DIGIT}{{1,2}}[\\-/]{_DIGIT}{{2,4}}"
# A number may start with . , or : (":20" in "10:20:30" after a word) in 3.4.1.
_NUM = f"(?:{_DIGIT}+|{_DIGIT}*(?:[.:,\u00AD\u066B\u066C]{_DIGIT}+)+)"
_NUMBER = f"[\\-+]?{_NUM}"
_SUBSUPNUM = r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"
_FRAC = f"(?:{_DIGIT}{{1,4}}[\\- \u00A0])?{_DIGIT}{{1,4}}(?:\\\\?/|\u2044){_DIGIT}{{1,4}}"
_FRAC2 = r"[\u00BC\u00BD\u00BE\u2153-\u215E]"
_DOLSIGN = r"(?:[A-Z]*\$|#)"
_DOLSIGN2 = r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]"
_SPLET = r"&[aeiouAEIOU](?:acute|grave|uml);"
_LETTER = (r"(?:\p{L}|" + _SPLET + r"|[\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF"
           r"\u0300-\u036F\u0370-\u037D\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF"
           r"\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5"
           r"\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F"
           r"\u0711\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C"
           r"\u093E-\u094E\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8"
           r"\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83"
           r"\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56"
           r"\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD])")
# A word may hold inner . ! ? followed by a letter ("dog.A" is one token in 3.4.1).
_WORD = f"{_LETTER}(?:{_LETTER}|{_DIGIT})*(?:[.!?]{_LETTER}(?:{_LETTER}|{_DIGIT})*)*"
_ALNUM = r"[\p{L}\p{Nd}]"
_APOS = r"(?:['\u0092\u2019]|&apos;)"
_APOSETCETERA = f"(?:{_APOS}|[`\u0091\u2018\u201B])"
_HYPHEN = r"[\-_\u058A\u2010\u2011]"
_THING = (f"(?:[dDoOlL]{_APOSETCETERA}{_ALNUM})?{_ALNUM}+"
          f"(?:{_HYPHEN}(?:[dDoOlL]{_APOSETCETERA}{_ALNUM})?{_ALNUM}+)*")
_THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
_THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
_FILENAME_EXT = (r"(?:bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|"
                 r"pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip|3gp|wm[va]|avi|flv|mov|mp[34g])")
_FILENAME = f"{_ALNUM}+(?:\\.{_ALNUM}+)*\\.{_FILENAME_EXT}"
_ACRO = r"(?:[A-Za-z](?:\.[A-Za-z])*|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R))"
_ACRO2 = r"(?:[A-Za-z](?:\.[A-Za-z])+|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R))"
_HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{_ACRO2}\\.))+"
_REDAUX = f"{_APOS}(?:[msdMSD]|re|ve|ll)"
_SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_SREDAUX = f"n{_APOSETCETERA}t"
_APOWORD = (f"(?:{_APOS}n{_APOS}?|[lLdDjJ]{_APOS}|Dunkin{_APOS}|somethin{_APOS}|ol{_APOS}|{_APOS}em"
            f"|[A-HJ-XZn]{_APOSETCETERA}\\p{{L}}{{2}}\\p{{L}}*|{_APOS}[2-9]0s|{_APOS}till?"
            f"|\\p{{L}}\\p{{L}}*[aeiouyAEIOUY]{_APOSETCETERA}[aeiouA-Z]\\p{{L}}*"
            f"|{_APOS}cause|cont'd\\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|O{_APOSETCETERA}o)")
_APOWORD2 = f"y{_APOS}"
_FULLURL = r"https?://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},\-]"
_LIKELYURL = (r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
              # `,-_` is a character RANGE in the flex source (U+002C..U+005F: digits, upper-case
              # letters, @ [ ] ...), almost certainly unintended; kept because the jar has it.
              r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){}\u002C-\u005F$]+\.)+(?:com|net|org|edu)))"
              r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?")
_EMAIL = (r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
          r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?")
_TWITTER = f"(?:@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+)"
_ABMONTH = r"(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)"
_ABDAYS = r"(?:Mon|Tue|Tues|Wed|Thu|Thurs|Fri)"
_ABSTATE = (r"(?:Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|"
            r"Mich|Minn|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo)")
_ABCOMP = r"(?:Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys)"
_ABNUM = r"(?:tel|est|ext|sq)"
_ABPTIT = r"(?:Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq)"
_ABBREV1 = f"(?:{_ABMONTH}|{_ABDAYS}|{_ABSTATE}|{_ABCOMP}|{_ABNUM}|{_ABPTIT}|etc|al|seq|Bldg)\\."
_ABTITLE = (r"(?:Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|"
            r"Pvt|Capt|Ste?|Ave|Pres|Lieut|Rt|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|"
            r"Mlle|Mme|Msgr|Sfc|Sr)")
_ABCOMP2 = r"(?:Invt|Elec|Natl|M[ft]g|Dept|Blvd|Rd|Ave)"
_ABBREV4 = f"(?:{_ABTITLE}|vs|Alex|Wm|Jos|Cie|a\\.k\\.a|cf|TREAS|Ph|{_ACRO}|{_ABCOMP2})"
_ABBREV2 = f"{_ABBREV4}\\."
_ACRONYM = f"{_ACRO}\\."
_ABBREV3 = r"(?:ca|figs?|prop|nos?|art|bldg|prop|pp|op)\."
_PHONE = (r"(?:(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])"
          r"[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5})")
_HYPHENS = r"\-+"
_LDOTS = r"(?:\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026])"
_FNMARKS = r"(?:@+|#+|_+)"
_ASTS = r"(?:\*+|(?:\\\*){1,3})"
_INSENTP = r"[,;:\u3001]"
_QUOTES = f"(?:{_APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{{1,2}})"
_DBLQUOT = r"(?:\"|&quot;)"
_TBSPEC = f"(?:-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\\.D\\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{_APOS}n|c{_APOS}est)"
_TBSPEC2 = f"{_APOS}[0-9][0-9]"
_SMILEY = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
# The first alternative is literally "^.[^x=~<>]" in the flex source (`\.\[\^x=~<>]`, a typo).
_ASIANSMILEY = (r"(?:[\^x=~<>]\.\[\^x=~<>\]|[\-\^x=~<>']_[\-\^x=~<>']"
                r"|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\))")
_MISCSYMBOL = (r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7"
               r"\u0387\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B"
               r"\u061E\u066A\u066D\u0703-\u070D\u07F6\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017"
               r"\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F"
               r"\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")

# --------------------------------------------------------------------------------------------
# Actions. Each returns (token or None, characters to push back).
# --------------------------------------------------------------------------------------------
_NL = "\n"  # marker token for a line end (-preserveLines)


def _plain(text: str) -> tuple[str | None, int]:
    return text, 0


def _skip(text: str) -> tuple[str | None, int]:
    return None, 0


def _newline(text: str) -> tuple[str | None, int]:
    return _NL, 0


def _const(value: str) -> Callable[[str], tuple[str | None, int]]:
    return lambda text: (value, 0)


def _pushback(n: int) -> Callable[[str], tuple[str | None, int]]:
    return lambda text: (text[:-n], n)


_SINGLE_QUOTE = regex.compile(r"&apos;|'")
_DOUBLE_QUOTE = regex.compile(r"\"|&quot;")


def _latex_quotes(text: str, probably_left: bool) -> str:
    """PTBLexer.latexQuotes (the ptb3Escaping default)."""
    if probably_left:
        text = _SINGLE_QUOTE.sub("`", text)
        text = _DOUBLE_QUOTE.sub("``", text)
    else:
        text = _SINGLE_QUOTE.sub("'", text)
        text = _DOUBLE_QUOTE.sub("''", text)
    text = regex.sub("[\u0091\u2018\u201B\u2039]", "`", text)
    text = regex.sub("[\u0092\u2019\u203A]", "'", text)
    text = regex.sub("[\u0093\u201C\u00AB]", "``", text)
    return regex.sub("[\u0094\u201D\u00BB]", "''", text)


def _quotes(probably_left: bool) -> Callable[[str], tuple[str | None, int]]:
    return lambda text: (_latex_quotes(text, probably_left), 0)


def _soft_hyphens(text: str) -> tuple[str | None, int]:
    out = text.replace("\u00AD", "")
    return (out or "-"), 0


def _nbsp(text: str) -> tuple[str | None, int]:
    return text.replace(" ", "\u00A0"), 0


def _amp(text: str) -> tuple[str | None, int]:
    return regex.sub(r"(?i:&amp;)", "&", text), 0


def _currency(text: str) -> tuple[str | None, int]:
    text = text.replace("\u00A2", "cents").replace("\u00A3", "#")
    return regex.sub("[\u0080\u00A4\u20A0\u20AC]", "$", text), 0


_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _fraction(text: str) -> tuple[str | None, int]:
    return "".join(_FRACTIONS.get(c, c) for c in text), 0


def _phone(text: str) -> tuple[str | None, int]:
    return text.replace(" ", "\u00A0").replace("(", "-LRB-").replace(")", "-RRB-"), 0


def _smiley(text: str) -> tuple[str | None, int]:
    return text.replace("(", "-LRB-").replace(")", "-RRB-"), 0


def _dashes(text: str) -> tuple[str | None, int]:
    return ("--" if 3 <= len(text) <= 4 else text), 0


def _acronym(text: str) -> tuple[str | None, int]:
    """processAcronym: "U.S." before a sentence-starting word is "U.S." + "."; "I." is "I" + "."."""
    if len(text) == 2:
        return text[:1], 1
    return text, 1


def _abbrev_sentence_end(text: str) -> tuple[str | None, int]:
    """processAbbrev1: an abbreviation ending a sentence also yields the period as a token."""
    return text, 1


@dataclass(frozen=True)
class _Rule:
    name: str
    pattern: "regex.Pattern[str]"  # (?P<t>token)trailing-context, POSIX (longest) semantics
    action: Callable[[str], tuple[str | None, int]]


def _caseless(pattern: str) -> str:
    """JFlex `%caseless` for a regex: ASCII letters outside character classes and escapes match
    either case; classes (`[A-Z]`), escapes (`\\p{Lu}`, `\\u00A0`), group syntax and counted
    repetitions are copied unchanged."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if pattern.startswith(("\\p{", "\\P{"), i):
                j = pattern.index("}", i) + 1
            elif pattern[i + 1:i + 2] == "u":
                j = i + 6
            elif pattern[i + 1:i + 2] == "x":
                j = i + 4
            else:
                j = i + 2
        elif c == "[":
            j = i + 1
            if pattern[j:j + 1] == "^":
                j += 1
            while pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            j += 1
        elif c == "(" and pattern[i + 1:i + 2] == "?":
            j = i + 2
            if pattern[j:j + 2] == "P<":
                j = pattern.index(">", j) + 1
            elif pattern[j:j + 1] == ":":
                j += 1
            else:  # inline flags such as (?p)
                j = pattern.index(")", j) + 1
        elif c == "{":
            j = pattern.index("}", i) + 1
        elif c.isascii() and c.isalpha():
            out.append(f"[{c.lower()}{c.upper()}]")
            i += 1
            continue
        else:
            j = i + 1
        out.append(pattern[i:j])
        i = j
    return "".join(out)


def _rule(name: str, token: str, action: Callable[[str], tuple[str | None, int]],
          context: str = "") -> _Rule:
    # POSIX matching gives the longest match of each rule (a JFlex DFA's answer), not Perl's first.
    pattern = regex.compile(f"(?p)(?P<t>{_caseless(token)}){_caseless(context)}")
    return _Rule(name, pattern, action)


@functools.cache
def _rules() -> tuple[_Rule, ...]:
    """The lexer rules in PTBLexer.flex order (earlier rule wins a tie in length)."""
    acronym_follow = ("[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|"
                      "[A]t|[B]ut|[E]arlier|[H]e|[H]er|[H]ere|[H]owever|[I]f|"
                      "[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\\.|[M]s\\.|[N]ow|"
                      "[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]o|[S]ome|"
                      "[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here|[T]hese|[T]hey|"
                      "[T]his|[W]e|[W]hen|[W]hile|[W]hat|[Y]et|[Y]ou")
    return (
        _rule("PROG_LANGS", r"c[+][+]|(?:c|f)#", _plain),
        _rule("ASSIMILATIONS3", r"cannot|'twas", _pushback(3)),
        _rule("ASSIMILATIONS2", r"'tis|gonna|gotta|lemme|gimme|wanna", _pushback(2)),
        _rule("SGML", _SGML, _nbsp_sgml),
        _rule("SPMDASH", r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", _const("--")),
        _rule("SPAMP", r"&amp;", _amp),
        _rule("SPPUNC", r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", _plain),
        _rule("WORD/REDAUX", _WORD, _soft_hyphens, _REDAUX),
        _rule("SWORD/SREDAUX", _SWORD, _soft_hyphens, _SREDAUX),
        _rule("WORD", _WORD, _soft_hyphens),
        _rule("APOWORD", _APOWORD, _plain),
        _rule("APOWORD2", _APOWORD2, _plain, r"\p{L}"),
        _rule("FULLURL", _FULLURL, _plain),
        _rule("LIKELYURL", _LIKELYURL, _plain),
        _rule("EMAIL", _EMAIL, _plain),
        _rule("TWITTER", _TWITTER, _plain),
        _rule("REDAUX/nonletter", _REDAUX, _quotes(False), r"[^A-Za-z]"),
        _rule("SREDAUX/nonletter", _SREDAUX, _quotes(False), r"[^A-Za-z]"),
        _rule("DATE", _DATE, _plain),
        _rule("NUMBER", _NUMBER, _soft_hyphens),
        _rule("SUBSUPNUM", _SUBSUPNUM, _plain),
        _rule("FRAC", _FRAC, _nbsp),
        _rule("FRAC2", _FRAC2, _fraction),
        _rule("TBSPEC", _TBSPEC, _amp),
        _rule("THING3", _THING3, _plain),
        _rule("DOLSIGN", _DOLSIGN, _plain),
        _rule("DOLSIGN2", _DOLSIGN2, _currency),
        _rule("ACRONYM/sentence", _ACRONYM, _acronym,
              f"{_SPACENLS}(?:{acronym_follow}|{_SGML}){_SPACENL}"),
        _rule("ABBREV3/digit", _ABBREV3, _plain, f"{_SPACENL}?{_DIGIT}"),
        _rule("PTY/ltd", r"(?:pt[eyEY]|co)\.", _plain, f"{_SPACE}(?:ltd|lim)"),
        _rule("ABBREV1/SENTEND", _ABBREV1, _abbrev_sentence_end, _SENTEND),
        _rule("ABBREV1/any2", _ABBREV1, _plain, r"[\s\S][\s\S]"),
        _rule("ABBREV1", _ABBREV1, _abbrev_sentence_end),
        _rule("ABBREV2", _ABBREV2, _plain),
        _rule("ABBREV4/SPACE", _ABBREV4, _plain, _SPACE),
        _rule("ACRO/SPACENL", _ACRO, _plain, _SPACENL),
        _rule("TBSPEC2/SPACENL", _TBSPEC2, _plain, _SPACENL),
        _rule("FILENAME", _FILENAME, _plain, f"(?:{_SPACENL}|[.?!,])"),
        _rule("WORD./INSENTP", f"{_WORD}\\.", _soft_hyphens, _INSENTP),
        _rule("PHONE", _PHONE, _phone),
        _rule("DBLQUOT/alnum", _DBLQUOT, _quotes(True), r"[A-Za-z0-9$]"),
        _rule("DBLQUOT", _DBLQUOT, _quotes(False)),
        _rule("DEL", r"\x7F", _skip),
        _rule("LESSTHAN", r"<|&lt;", _const("<")),
        _rule("GREATERTHAN", r">|&gt;", _const(">")),
        _rule("SMILEY", _SMILEY, _smiley, r"[^A-Za-z0-9]"),
        _rule("ASIANSMILEY", _ASIANSMILEY, _smiley),
        _rule("LCB", r"\{", _const("-LCB-")),
        _rule("RCB", r"\}", _const("-RCB-")),
        _rule("LSB", r"\[", _const("-LSB-")),
        _rule("RSB", r"\]", _const("-RSB-")),
        _rule("LRB", r"\(", _const("-LRB-")),
        _rule("RRB", r"\)", _const("-RRB-")),
        _rule("HYPHENS", _HYPHENS, _dashes),
        _rule("LDOTS", _LDOTS, _const("...")),
        _rule("FNMARKS", _FNMARKS, _plain),
        _rule("ASTS", _ASTS, _plain),
        _rule("INSENTP", _INSENTP, _plain),
        _rule("QUESTION", r"[?!]+", _plain),
        _rule("PERIOD", r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", _plain),
        _rule("EQUALS", r"=", _plain),
        _rule("SLASH", r"/", _plain),
        _rule("HTHING./INSENTP", f"{_HTHING}\\.", _soft_hyphens, _INSENTP),
        _rule("HTHING", _HTHING, _soft_hyphens),
        _rule("THING./INSENTP", f"{_THING}\\.", _plain, _INSENTP),
        _rule("THING", _THING, _plain),
        _rule("THINGA./INSENTP", f"{_THINGA}\\.", _amp, _INSENTP),
        _rule("THINGA", _THINGA, _amp),
        _rule("QUOTE/left", r"'", _quotes(True), r"[A-Za-z][^ \t\n\r\u00A0]"),
        _rule("QUOTES", _QUOTES, _quotes(False)),
        _rule("REDAUX", _REDAUX, _quotes(False)),  # at the end of the text ("it's")
        _rule("SREDAUX", _SREDAUX, _quotes(False)),
        _rule("FAKEDUCKFEET", r"<<|>>", _plain),
        _rule("MISCSYMBOL", _MISCSYMBOL, _plain),
        _rule("SPACES", r"\x00|" + _SPACES + r"|[\u200B\u200E\u200F\uFEFF]", _skip),
        _rule("NEWLINE", _NEWLINE, _newline),
        _rule("NBSP_ENTITY", r"&nbsp;", _skip),
        _rule("UNTOKENIZABLE", r"[\s\S]", _skip),  # untokenizable=firstDelete: dropped
    )


def _nbsp_sgml(text: str) -> tuple[str | None, int]:
    return regex.sub(r"[ \r\n]", "\u00A0", text), 0


def _lex(text: str, *, fast_path: bool = True) -> list[str]:
    """Tokens of `text` (JFlex semantics: longest match, first rule on ties), `_NL` at line ends."""
    tokens: list[str] = []
    pos, end = 0, len(text)
    line_end = window = -1
    while pos < end:
        if pos > line_end:
            line_end, window = _window(text, pos)
        fast = _FAST_WORD.match(text, pos, window) if fast_path else None
        if fast is not None and fast.group(1).lower() not in _FAST_EXCLUDED:
            tokens.append(fast.group(1))
            pos = fast.end(1)
            continue
        best: tuple[int, int, _Rule, str] | None = None  # (total length, -rule index, rule, token)
        for index, rule in _candidates(text[pos]):
            match = rule.pattern.match(text, pos, window)
            if match is None:
                continue
            total = match.end() - pos
            if best is None or total > best[0]:
                best = (total, -index, rule, match.group("t"))
        assert best is not None  # UNTOKENIZABLE matches any character
        _, _, rule, token_text = best
        token, pushback = rule.action(token_text)
        if token is not None:
            tokens.append(token)
        pos += len(token_text) - pushback
    return tokens


_BLANK_LINE = regex.compile(r"[ \t\u00A0\u2000-\u200A\u3000\u0085]*")


def _window(text: str, pos: int) -> tuple[int, int]:
    r"""(end of the line holding `pos`, end of the text any match starting on that line may read).

    No token crosses a line end, and trailing contexts read at most the blank lines that follow
    and the next non-blank line (ACRONYM's "U.S.\n\nThe ", SENTEND's "etc.\nA"). Matching within
    this window gives the same result as matching against the whole text, and keeps each match
    O(line): the `regex` module scans to the end of the text for a rule's required literal (the "@"
    of EMAIL), which over a whole COCO split made lexing quadratic."""
    line_end = text.find("\n", pos)
    if line_end < 0:
        return len(text), len(text)
    start = line_end + 1
    while True:
        nl = text.find("\n", start)
        if nl < 0:
            return line_end, len(text)
        if _BLANK_LINE.fullmatch(text, start, nl) is None:
            return line_end, nl + 1
        start = nl + 1


@functools.lru_cache(maxsize=4096)
def _candidates(first: str) -> tuple[tuple[int, _Rule], ...]:
    """The rules (with their priority) that can match a text starting with `first`: those whose
    pattern accepts `first` as a prefix (a partial match). Saves most of the ~80 tries per token."""
    return tuple((index, rule) for index, rule in enumerate(_rules())
                 if rule.pattern.match(first, partial=True) is not None)


# A plain ASCII word followed by a space, line end or end of text is a WORD token whatever the
# other rules say (none of them can match longer text to a different token there) unless it is
# an assimilation the lexer splits. This fast path skips ~80 regex calls for most tokens; the
# parity test compares with and without it.
_FAST_WORD = regex.compile(r"([A-Za-z]+)(?=[ \t\n]|\Z)")
_FAST_EXCLUDED = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})

#: Line separators of the jar other than "\n": they would start a new output line and misalign
#: every later caption in pycocoevalcap, so they are read as spaces (documented difference).
_EXTRA_NEWLINES = str.maketrans({"\r": " ", "\u2028": " ", "\u2029": " ", "\u000B": " ", "\u000C": " "})


def _to_utf16_units(text: str) -> str:
    """Characters beyond U+FFFF as two surrogate code points: the jar lexes UTF-16 code units, so
    an emoji is two untokenizable units (deleted) and a negated class matches each unit."""
    return "".join(c if c <= "\uffff" else
                   chr(0xD800 + ((ord(c) - 0x10000) >> 10)) + chr(0xDC00 + ((ord(c) - 0x10000) & 0x3FF))
                   for c in text)


def _from_utf16_units(token: str) -> str:
    return token.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def tokenize_lines(lines: Sequence[str], *, fast_path: bool = True) -> list[str]:
    """PTBTokenizer `-preserveLines -lowerCase` over `lines` joined by newlines, one output line
    per input line (tokens joined by single spaces), before punctuation removal."""
    text = "\n".join(line.replace("\n", " ").translate(_EXTRA_NEWLINES) for line in lines)
    astral = any(c > "\uffff" for c in text)
    if astral:
        text = _to_utf16_units(text)
    out: list[list[str]] = [[]]
    for token in _lex(text, fast_path=fast_path):
        if token == _NL:
            out.append([])
        else:
            out[-1].append(_from_utf16_units(token).lower() if astral else token.lower())
    if len(out) != max(len(lines), 1):  # a token swallowed a line end: a bug here, never silent
        raise AssertionError(f"PTB lexer produced {len(out)} lines for {len(lines)} captions")
    return [" ".join(tokens) for tokens in out[:len(lines)]]


def _strip_punctuation(line: str) -> str:
    # pycocoevalcap: ' '.join([w for w in line.rstrip().split(' ') if w not in PUNCTUATIONS])
    return " ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATION_SET)


def ptb_tokenize(caption: str) -> str:
    """One caption as pycocoevalcap's tokenizer returns it when it is alone in the batch."""
    return _strip_punctuation(tokenize_lines([caption])[0])


def tokenize_captions(captions_for_image: Mapping[object, Iterable[object]]) -> dict[object, list[str]]:
    """Drop-in for `pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer().tokenize`: maps image id to
    its list of captions (strings, or dicts with a "caption" key as COCO annotations are) and
    returns image id to tokenised captions, joined over all images in dict order exactly as
    pycocoevalcap joins them (so cross-caption context is the same)."""
    image_ids: list[object] = []
    lines: list[str] = []
    for image_id, captions in captions_for_image.items():
        for caption in captions:
            text = caption["caption"] if isinstance(caption, Mapping) else caption
            if not isinstance(text, str):
                raise TypeError(f"caption of image {image_id!r} must be a string, got {type(text).__name__}")
            image_ids.append(image_id)
            lines.append(text)
    result: dict[object, list[str]] = {}
    for image_id, line in zip(image_ids, tokenize_lines(lines)):
        result.setdefault(image_id, []).append(_strip_punctuation(line))
    return result
