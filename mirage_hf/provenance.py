"""Provenance metadata beside the pixel score: C2PA manifests and the IPTC `DigitalSourceType` of XMP.

What a file says about its origin is reported, never mixed into p(fake): a manifest can be stripped by any
re-save, and a forged XMP packet costs nothing; a signed, valid C2PA manifest is the only claim with a
signature behind it. C2PA is read with the `c2pa` library (the `[provenance]` extra) without network access
(no remote manifests, no OCSP); trust anchors are optional, without them a valid signature from an unknown
signer is "valid", not "trusted". XMP is found by scanning the file for its packet, as the XMP specification
allows for any format, so it works alike for JPEG, PNG, WebP, GIF, TIFF, MP4 and MOV.
"""

from __future__ import annotations

import os
from typing import NamedTuple
from xml.etree import ElementTree

PROVENANCE_EXTRA = "reading C2PA manifests needs the c2pa library: pip install 'mirage-hf[provenance]'"
IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
GENERATED_SOURCE_TYPES = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"})
"""IPTC digital source types that say "made (in part) by a generative model"; counted by `mirage-detect`."""
XMP_START, XMP_END = b"<x:xmpmeta", b"</x:xmpmeta>"
MAX_XMP_BYTES = 4 << 20  # a packet start with no end within this many bytes is not a packet
_CHUNK = 1 << 20


class Provenance(NamedTuple):
    source_type: str | None = None
    """The IPTC digital source type (its code, e.g. "trainedAlgorithmicMedia"): the C2PA manifest's creation
    action, else the XMP packet's Iptc4xmpExt:DigitalSourceType; None when neither states one."""
    c2pa_generator: str | None = None
    """The generator the manifest names: its creation action's software agent, else its claim generator."""
    c2pa_signer: str | None = None
    """The signing certificate's common name and, in parentheses, its issuer."""
    c2pa_validation: str | None = None
    """"trusted", "valid" (intact, signer not among the trust anchors), "invalid (failure codes)", "unreadable
    (why)" for a damaged manifest, "none" without a manifest; None when C2PA was not read."""

    @property
    def says_generated(self) -> bool:
        return self.source_type in GENERATED_SOURCE_TYPES


def source_type_code(value: str) -> str:
    """`http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia` -> `trainedAlgorithmicMedia`."""
    return value.strip().rstrip("/").rsplit("/", 1)[-1]


def xmp_packets(path: str):
    """The XMP packets (`<x:xmpmeta ...>...</x:xmpmeta>` bytes) in the file at `path`, read in 1 MB chunks."""
    with open(path, "rb") as handle:
        buffer = b""
        while chunk := handle.read(_CHUNK):
            buffer += chunk
            while (start := buffer.find(XMP_START)) >= 0:
                end = buffer.find(XMP_END, start)
                if end < 0:
                    if len(buffer) - start > MAX_XMP_BYTES:
                        buffer = buffer[start + len(XMP_START) :]
                        continue
                    buffer = buffer[start:]
                    break
                yield buffer[start : end + len(XMP_END)]
                buffer = buffer[end + len(XMP_END) :]
            else:
                buffer = buffer[-len(XMP_START) :]


def xmp_source_type(packet: bytes) -> str | None:
    """The Iptc4xmpExt:DigitalSourceType of an XMP packet (element, attribute or rdf:resource form), as its code.
    Raises ValueError for a packet that is not well-formed XML."""
    try:
        root = ElementTree.fromstring(packet)
    except ElementTree.ParseError as err:
        raise ValueError(f"malformed XMP ({err})") from err
    name = f"{{{IPTC_EXT}}}DigitalSourceType"
    for element in root.iter():
        if name in element.attrib:
            return source_type_code(element.attrib[name])
        if element.tag == name:
            value = element.text or element.attrib.get(f"{{{RDF}}}resource", "")
            if value.strip():
                return source_type_code(value)
    return None


def _manifest_claims(manifest: dict) -> tuple[str | None, str | None]:
    """(digital source type code, generator) from a manifest's creation action and claim generator."""
    source_type = generator = None
    for assertion in manifest.get("assertions", []):
        if assertion.get("label", "").startswith("c2pa.actions"):
            for action in assertion.get("data", {}).get("actions", []):
                if action.get("action") in ("c2pa.created", "c2pa.opened") and source_type is None:
                    source_type = (
                        source_type_code(action["digitalSourceType"]) if "digitalSourceType" in action else None
                    )
                    agent = action.get("softwareAgent")
                    generator = agent.get("name") if isinstance(agent, dict) else agent
    if generator is None:
        info = manifest.get("claim_generator_info") or [{}]
        generator = " ".join(str(info[0][key]) for key in ("name", "version") if info[0].get(key)) or None
        generator = generator or manifest.get("claim_generator")
    return source_type, generator


def _c2pa():
    try:
        import c2pa
    except ImportError as err:
        raise ImportError(PROVENANCE_EXTRA) from err
    return c2pa


class C2paReader:
    """Reads C2PA manifests offline (no remote manifest, no OCSP), trusting the CA certificates of the PEM file
    `trust_anchors` if given. The native context is built in each process that reads (DataLoader workers too)."""

    def __init__(self, trust_anchors: str | None = None):
        _c2pa()  # the missing extra is named when the option is given, not at the first file
        self.anchors = None
        if trust_anchors is not None:
            with open(trust_anchors, encoding="utf-8") as handle:
                self.anchors = handle.read()
        self._context = self._pid = None

    def __getstate__(self):  # a spawned worker builds its own native context
        return {**self.__dict__, "_context": None, "_pid": None}

    def _reader(self, path: str, handle):
        c2pa = _c2pa()
        if self._pid != os.getpid():
            settings = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
            if self.anchors is not None:
                settings["trust"] = {"trust_anchors": self.anchors}
            self._context, self._pid = c2pa.Context.from_dict(settings), os.getpid()
        return c2pa.Reader(path, handle, context=self._context)

    def read(self, path: str) -> tuple[str | None, str | None, str | None, str]:
        """(source type, generator, signer, validation) of the manifest in the file at `path`."""
        error = _c2pa().C2paError
        try:
            with open(path, "rb") as handle, self._reader(path, handle) as reader:
                manifest = reader.get_active_manifest() or {}
                state = (reader.get_validation_state() or "invalid").lower()
                results = (reader.get_validation_results() or {}).get("activeManifest") or {}
        except (error.ManifestNotFound, error.NotSupported):
            return None, None, None, "none"
        except error as err:
            return None, None, None, f"unreadable ({err})"
        source_type, generator = _manifest_claims(manifest)
        info = manifest.get("signature_info") or {}
        signer = info.get("common_name") or None
        if signer and info.get("issuer"):
            signer = f"{signer} ({info['issuer']})"
        if state == "invalid":
            codes = sorted(
                {f["code"] for f in results.get("failure", []) if f.get("code") != "signingCredential.untrusted"}
            )
            state = f"invalid ({', '.join(codes)})" if codes else state
        return source_type, generator, signer, state


def read_provenance(path: str, c2pa: C2paReader | None = None) -> Provenance:
    """The provenance columns of the file at `path`; never raises for what the file holds (a malformed XMP
    packet or a damaged manifest is reported in the columns). `c2pa` None reads XMP only."""
    source_type = None
    if os.path.isfile(path):
        for packet in xmp_packets(path):
            try:
                source_type = xmp_source_type(packet)
            except ValueError:
                continue  # a malformed packet says nothing; another packet may
            if source_type is not None:
                break
    if c2pa is None or not os.path.isfile(path):
        return Provenance(source_type)
    c2pa_source_type, generator, signer, validation = c2pa.read(path)
    return Provenance(c2pa_source_type or source_type, generator, signer, validation)
