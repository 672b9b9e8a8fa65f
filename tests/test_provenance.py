"""Provenance metadata in `mirage-detect --provenance`: XMP DigitalSourceType and C2PA manifests, the latter signed
in the test with a throwaway CA and signing certificate made with `cryptography` (all offline)."""

import datetime
import io
import json
import pickle
import sys

import c2pa
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mirage_hf.cli import main
from mirage_hf.provenance import C2paReader, read_provenance, xmp_source_type

SOURCE_TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
XMP_ATTRIBUTE = (
    '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" Iptc4xmpExt:DigitalSourceType="{}"/>'
    '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
)
XMP_ELEMENT = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:I="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"><I:DigitalSourceType>{}'
    "</I:DigitalSourceType></rdf:Description></rdf:RDF></x:xmpmeta>"
)


def certificate(subject, issuer, public_key, signing_key, ca):
    """An X.509 certificate for `subject` signed by `signing_key`; `issuer` None makes it self-signed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Throwaway Test Org")])  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                           "encipher_only", "decipher_only"), False)  # fmt: skip
    builder = builder.add_extension(
        x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage), critical=True
    )
    if not ca:  # C2PA wants a signing certificate with an extended key usage and its issuer's key id
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A C2PA-signed JPEG (and its tampered and damaged copies), images with XMP, one without any metadata."""
    root = tmp_path_factory.mktemp("provenance")
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("Throwaway CA", None, ca_key.public_key(), ca_key, ca=True)
    signing = certificate("Throwaway Signer", ca.subject, key.public_key(), ca_key, ca=False)
    pem = lambda cert: cert.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    (root / "anchors.pem").write_bytes(pem(ca))
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", pem(signing) + pem(ca), private, None))
    manifest = {
        "claim_generator_info": [{"name": "mirage-hf-tests", "version": "1"}],
        "title": "made.jpg",
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
            "action": "c2pa.created", "digitalSourceType": SOURCE_TYPES + "trainedAlgorithmicMedia",
            "softwareAgent": {"name": "ToyDiffusion 2.1"}}]}}],
    }  # fmt: skip
    source, signed = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (48, 40), (180, 60, 20)).save(source, "JPEG")
    source.seek(0)
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, "image/jpeg", source, signed)
    data = signed.getvalue()
    (root / "signed.jpg").write_bytes(data)
    table = data.rfind(b"\xff\xdb") + 10  # in the image's quantization table (not the thumbnail's in the manifest)
    (root / "tampered.jpg").write_bytes(data[:table] + bytes([data[table] % 200 + 2]) + data[table + 1 :])
    jumbf = data.find(b"jumb")
    (root / "broken-manifest.jpg").write_bytes(data[: jumbf + 200] + b"\0" * 60 + data[jumbf + 260 :])

    pixels = Image.new("RGB", (40, 36), (20, 90, 200))
    pixels.save(root / "xmp.jpg", xmp=XMP_ATTRIBUTE.format(SOURCE_TYPES + "trainedAlgorithmicMedia").encode())
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP_ELEMENT.format(SOURCE_TYPES + "compositeWithTrainedAlgorithmicMedia"))
    pixels.save(root / "xmp.png", pnginfo=info)
    pixels.save(root / "camera.webp", xmp=XMP_ATTRIBUTE.format(SOURCE_TYPES + "digitalCapture").encode())
    broken = XMP_ATTRIBUTE.format(SOURCE_TYPES + "trainedAlgorithmicMedia").replace("</rdf:RDF>", "")
    pixels.save(root / "malformed-xmp.jpg", xmp=broken.encode())
    pixels.save(root / "plain.png")
    return root


def test_xmp_source_type_in_element_attribute_and_resource_form():
    assert xmp_source_type(XMP_ATTRIBUTE.format(SOURCE_TYPES + "trainedAlgorithmicMedia").encode()) == (
        "trainedAlgorithmicMedia"
    )
    assert xmp_source_type(XMP_ELEMENT.format("digitalCapture").encode()) == "digitalCapture"
    resource = XMP_ELEMENT.replace(">{}</I:DigitalSourceType>", ' rdf:resource="{}"/>').format(
        SOURCE_TYPES + "screenCapture"
    )
    assert xmp_source_type(resource.encode()) == "screenCapture"
    with pytest.raises(ValueError, match="malformed XMP"):
        xmp_source_type(b"<x:xmpmeta><unclosed></x:xmpmeta>")


def scan(capsys, *args):
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return (
        code,
        {row["path"].rsplit("/", 1)[-1]: row for row in map(json.loads, captured.out.splitlines())},
        captured.err,
    )


EXPECTED = {  # name: (source_type, c2pa_generator, c2pa_signer, c2pa_validation without trust anchors)
    "signed.jpg": ("trainedAlgorithmicMedia", "ToyDiffusion 2.1", "Throwaway Signer (Throwaway Test Org)", "valid"),
    "tampered.jpg": (
        "trainedAlgorithmicMedia",
        "ToyDiffusion 2.1",
        "Throwaway Signer (Throwaway Test Org)",
        "invalid (assertion.dataHash.mismatch)",
    ),  # fmt: skip
    "xmp.jpg": ("trainedAlgorithmicMedia", None, None, "none"),
    "xmp.png": ("compositeWithTrainedAlgorithmicMedia", None, None, "none"),
    "camera.webp": ("digitalCapture", None, None, "none"),
    "malformed-xmp.jpg": (None, None, None, "none"),
    "plain.png": (None, None, None, "none"),
}


def test_provenance_columns_are_filled_and_never_change_the_score(capsys, files, detector_dir):
    code, plain, _ = scan(capsys, files, "--model", detector_dir, "--format", "jsonl")
    assert code == 0 and "source_type" not in plain["plain.png"]  # the columns come with --provenance only
    code, rows, err = scan(capsys, files, "--model", detector_dir, "--format", "jsonl", "--provenance")
    assert code == 0 and sorted(rows) == sorted([*EXPECTED, "broken-manifest.jpg"])
    for name, columns in EXPECTED.items():
        got = tuple(rows[name][key] for key in ("source_type", "c2pa_generator", "c2pa_signer", "c2pa_validation"))
        assert got == columns, name
    assert rows["broken-manifest.jpg"]["c2pa_validation"].startswith("unreadable (")
    for name, row in rows.items():  # the pixel score and the verdict are the same with and without metadata
        assert (row["label"], row["p_fake"]) == (plain[name]["label"], plain[name]["p_fake"]), name
    assert "4 whose metadata says AI-generated" in err  # signed, tampered (it still says so), xmp.jpg, xmp.png

    code, rows, _ = scan(capsys, files / "signed.jpg", files / "tampered.jpg", "--model", detector_dir, "--format",
                         "jsonl", "--provenance", "--c2pa_trust_anchors", files / "anchors.pem")  # fmt: skip
    assert rows["signed.jpg"]["c2pa_validation"] == "trusted"
    assert rows["tampered.jpg"]["c2pa_validation"] == "invalid (assertion.dataHash.mismatch)"


def test_provenance_is_read_in_workers_and_without_c2pa_xmp_alone(files):
    reader = C2paReader(str(files / "anchors.pem"))
    copy = pickle.loads(pickle.dumps(reader))  # what a spawned DataLoader worker gets
    assert read_provenance(str(files / "signed.jpg"), copy).c2pa_validation == "trusted"
    assert read_provenance(str(files / "xmp.png")) == ("compositeWithTrainedAlgorithmicMedia", None, None, None)


def test_missing_c2pa_library_is_a_one_line_error(capsys, files, detector_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "c2pa", None)  # makes `import c2pa` fail
    code = main([str(files), "--model", str(detector_dir), "--provenance"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "pip install 'mirage-hf[provenance]'" in err
    assert main([str(files), "--model", str(detector_dir), "--c2pa_trust_anchors", str(files / "anchors.pem")]) == 1
