"""Every public STS conformance vector found for DKGA02/DKGA04 + STA (EA07), reproduced digit for digit.

Source of all vectors in this file unless a row says otherwise: the STS 531-1-0-02 conformance
test cases as published by NectarAPI/tokens-service in
src/test/java/ke/co/nectar/token/domain/token/STSComplianceTests_STS_531_1_0_02_CTSAnn.java
(commit ea572db9f0eb4c96ab657b2c977518a69ca00b65); the CTSA number and step are cited on each row.
Common to them: random number 5, base date 1993 unless stated, key type 2, key expiry number 255.

NectarAPI prints a decoder key with its bytes reversed ("6ff35b9d1f3453e6" in CTSA01 step 1);
protocol.sts returns the key most significant byte first, the form the standard uses (and the form
of the STS example key 0ABC12DEF3456789), so the same key reads e653341f9d5bf36f here.

Issue times in those tests are wall-clock strings without a zone; tokens only depend on minutes
since the base date, so they are read as UTC here.

Amounts: NectarAPI passes kWh/m3 as a Java double and multiplies by 10; the tenths below are the
exact results of that conversion (checked: no value here loses a digit to binary floating point).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from protocol import sts

VENDING_KEY = bytes.fromhex("abababababababab")
VENDING_KEY_160 = bytes.fromhex("abababababababab949494949494949401234567")  # CTSA24-26 (DKGA04)
PAN_A = "600727000000000009"  # IIN 600727, DRN 00000000000
PAN_B = "000001000000000082"  # IIN 0000, DRN 0100000000008
ELECTRICITY, WATER, GAS = sts.CreditSubclass.ELECTRICITY, sts.CreditSubclass.WATER, sts.CreditSubclass.GAS


def at(text: str) -> datetime:
    return datetime.strptime(text, "%d/%m/%Y %H:%M:%S").replace(tzinfo=UTC)


def key02(pan: str = PAN_A, *, sgc: str = "123456", ti: str = "01", krn: int = 1,
          vending_key: bytes = VENDING_KEY) -> bytes:
    return sts.derive_decoder_key_dkga02(vending_key, 2, sgc, ti, krn, pan)


def key04(base_year: int, krn: int, pan: str = PAN_A) -> bytes:
    return sts.derive_decoder_key_dkga04(VENDING_KEY_160, 2, "123457", "01", krn, pan, base_year)


def test_dkga02_decoder_key_ctsa01_step1() -> None:
    # CTSA01 step1: expected key "6ff35b9d1f3453e6" as NectarAPI prints it (bytes reversed).
    key = key02(PAN_A)
    assert key.hex() == "e653341f9d5bf36f"
    assert key[::-1].hex() == "6ff35b9d1f3453e6"


CLASS0_DKGA02 = [
    # (source, pan, issued, subclass, units in tenths, expected token)
    ("CTSA01 step1", PAN_A, "01/03/2004 13:55:00", ELECTRICITY, 1, "23716100501183194197"),
    ("CTSA01 step2", PAN_B, "01/03/2004 14:00:00", ELECTRICITY, 1, "67206107716095682372"),
    ("CTSA01 step3", PAN_A, "01/03/2004 14:05:00", WATER, 1, "42502136492215507402"),
    ("CTSA01 step4", PAN_B, "01/03/2004 14:10:00", WATER, 1, "09109691696351271646"),
    ("CTSA01 step5", PAN_A, "01/03/2004 14:15:00", GAS, 1, "67586531586639825066"),
    ("CTSA01 step6", PAN_B, "01/03/2004 14:20:00", GAS, 1, "35758660990071466853"),
    # CTSA10: every exponent boundary of the amount field, for all three subclasses.
    ("CTSA10 step1", PAN_A, "01/04/2004 00:30:00", ELECTRICITY, 256, "26456622012185850752"),
    ("CTSA10 step2", PAN_A, "01/04/2004 00:35:00", ELECTRICITY, 16_383, "02194538019157867319"),
    ("CTSA10 step3", PAN_A, "01/04/2004 00:40:00", ELECTRICITY, 16_384, "49848950875249585071"),
    ("CTSA10 step4", PAN_A, "01/04/2004 00:45:00", ELECTRICITY, 20_000, "71997443697501228179"),
    ("CTSA10 step5", PAN_A, "01/04/2004 00:50:00", ELECTRICITY, 180_223, "58589277912776864555"),
    ("CTSA10 step6", PAN_A, "01/04/2004 00:55:00", ELECTRICITY, 180_224, "16328229234437142451"),
    ("CTSA10 step7", PAN_A, "01/04/2004 01:44:00", ELECTRICITY, 1_818_623, "45001756646344378677"),
    ("CTSA10 step8", PAN_A, "01/04/2004 01:49:00", ELECTRICITY, 1_818_624, "15810488151857362998"),
    ("CTSA10 step9", PAN_A, "01/04/2004 01:54:00", ELECTRICITY, 18_201_624, "42222423067848970276"),
    ("CTSA10 step10", PAN_A, "01/04/2004 00:30:00", WATER, 256, "44275716003808438853"),
    ("CTSA10 step11", PAN_A, "01/04/2004 00:35:00", WATER, 16_383, "18252763951429538816"),
    ("CTSA10 step12", PAN_A, "01/04/2004 00:40:00", WATER, 16_384, "27315011099256270180"),
    ("CTSA10 step13", PAN_A, "01/04/2004 00:45:00", WATER, 20_000, "63822263014624002901"),
    ("CTSA10 step14", PAN_A, "01/04/2004 00:50:00", WATER, 180_223, "09641054211308025667"),
    ("CTSA10 step15", PAN_A, "01/04/2004 00:55:00", WATER, 180_224, "44446096428101342168"),
    ("CTSA10 step16", PAN_A, "01/04/2004 01:44:00", WATER, 1_818_623, "28708466031297612806"),
    ("CTSA10 step17", PAN_A, "01/04/2004 01:49:00", WATER, 1_818_624, "10341114843091227763"),
    ("CTSA10 step18", PAN_A, "01/04/2004 01:54:00", WATER, 18_201_624, "05942777944950076038"),
    ("CTSA10 step19", PAN_A, "01/04/2004 00:30:00", GAS, 256, "55421978213496083894"),
    ("CTSA10 step20", PAN_A, "01/04/2004 00:35:00", GAS, 16_383, "19542256788533803049"),
    ("CTSA10 step21", PAN_A, "01/04/2004 00:40:00", GAS, 16_384, "00240351248989131846"),
    ("CTSA10 step22", PAN_A, "01/04/2004 00:45:00", GAS, 20_000, "09767096307961035977"),
    ("CTSA10 step23", PAN_A, "01/04/2004 00:50:00", GAS, 180_223, "48113663060937699726"),
    ("CTSA10 step24", PAN_A, "01/04/2004 00:55:00", GAS, 180_224, "03981404420542897416"),
    ("CTSA10 step25", PAN_A, "01/04/2004 01:44:00", GAS, 1_818_623, "14196243940519813244"),
    ("CTSA10 step26", PAN_A, "01/04/2004 01:49:00", GAS, 1_818_624, "49902394914324621132"),
    ("CTSA10 step27", PAN_A, "01/04/2004 01:54:00", GAS, 18_201_624, "13610552847224033160"),
    # CTSA21: water, amounts that need rounding up; one issue time has seconds (dropped from the TID).
    ("CTSA21 step1", PAN_A, "23/05/2005 10:01:00", WATER, 10, "15415954497866603070"),
    ("CTSA21 step2", PAN_A, "24/05/2005 10:02:00", WATER, 163_830, "37577557589608193918"),
    ("CTSA21 step3", PAN_A, "23/04/2006 23:10:03", WATER, 163_840, "64605231735471529556"),
    ("CTSA21 step4", PAN_A, "24/04/2006 10:04:00", WATER, 1_802_240, "61396462165248534316"),
    ("CTSA21 step5", PAN_A, "24/04/2006 11:00:00", WATER, 18_186_240, "27442853458265256809"),
    ("CTSA21 step6", PAN_A, "24/04/2006 11:01:00", WATER, 1_822_620, "60366325560961667086"),
    ("CTSA21 step7", PAN_A, "24/04/2006 11:02:00", WATER, 1_822_640, "49837510367703553651"),
    ("CTSA21 step8", PAN_A, "24/04/2006 11:03:00", WATER, 1_820_240, "65892074689465900210"),
    ("CTSA21 step9", PAN_A, "24/04/2006 11:04:00", WATER, 1_825, "31056801750423680816"),
    ("CTSA21 step10", PAN_A, "24/04/2006 11:05:00", WATER, 16_738, "20363556736975891316"),
    ("CTSA21 step12", PAN_A, "24/04/2006 11:00:00", WATER, 176_543, "20884251612329507769"),
    ("CTSA21 step13", PAN_A, "24/04/2006 20:12:00", WATER, 1_230, "29433837651179279051"),
    ("CTSA21 step14", PAN_A, "24/04/2006 20:14:00", WATER, 1_802_240, "56221045810819914754"),
    ("CTSA21 step15", PAN_A, "12/05/2006 20:15:00", WATER, 156_714, "07426208391727345260"),
    # CTSA22: gas, same kind of amounts.
    ("CTSA22 step1", PAN_A, "26/04/2006 10:01:00", GAS, 10, "30790445533281098559"),
    ("CTSA22 step2", PAN_A, "27/05/2006 10:02:00", GAS, 163_830, "42894813892015838675"),
    ("CTSA22 step3", PAN_A, "23/04/2007 10:03:00", GAS, 163_840, "52434363099394415104"),
    ("CTSA22 step4", PAN_A, "24/04/2007 10:04:00", GAS, 1_802_240, "02188175533508938765"),
    ("CTSA22 step5", PAN_A, "25/04/2007 11:00:00", GAS, 188_240, "37844075275013703544"),
    ("CTSA22 step6", PAN_A, "26/04/2007 11:01:00", GAS, 1_826_240, "21792662786579369978"),
    ("CTSA22 step7", PAN_A, "26/04/2007 11:02:00", GAS, 182_040, "49679852898684944605"),
    ("CTSA22 step8", PAN_A, "26/04/2007 11:03:00", GAS, 426_240, "23701256401082544774"),
    ("CTSA22 step9", PAN_A, "26/04/2007 11:04:00", GAS, 1_820_440, "37625880630538746268"),
    ("CTSA22 step10", PAN_A, "26/04/2007 11:05:00", GAS, 178_140, "41502904237047264837"),
    ("CTSA22 step11", PAN_A, "26/04/2007 20:10:00", GAS, 1_203_450, "69115163697886873528"),
    ("CTSA22 step12", PAN_A, "26/04/2007 11:00:00", GAS, 104_490, "57141025105111259130"),
    ("CTSA22 step13", PAN_A, "26/04/2007 20:12:00", GAS, 124_490, "07841085711493671481"),
    ("CTSA22 step14", PAN_A, "26/04/2007 20:14:00", GAS, 802_240, "53540735038206224963"),
    ("CTSA22 step15", PAN_A, "26/04/2007 20:15:00", GAS, 1_204_140, "64397019565756691049"),
]


@pytest.mark.parametrize(("source", "pan", "issued", "subclass", "units", "expected"), CLASS0_DKGA02,
                         ids=[row[0] for row in CLASS0_DKGA02])
def test_class0_credit_tokens_dkga02(source: str, pan: str, issued: str, subclass: int, units: int,
                                     expected: str) -> None:
    key = key02(pan)
    tid = sts.token_id(at(issued))
    assert sts.credit_token(key, subclass, tid, units, 5) == expected
    decoded = sts.decode_token(key, expected)
    assert decoded.crc_ok and decoded.token_class == 0 and decoded.subclass == subclass
    assert decoded.token_id == tid and decoded.random == 5
    assert decoded.units == sts.rounded_units(units) >= units


def test_class0_water_token_of_zero_units_ctsa21_step11() -> None:
    # CTSA21 step11 (water, 0 m3, 24/04/2006 20:10): the standard can carry 0; vendgate never issues
    # an empty credit token, so the vector is checked through decoding and the block encoder.
    key = key02()
    expected = "16838670950350007721"
    decoded = sts.decode_token(key, expected)
    assert decoded.crc_ok and (decoded.subclass, decoded.units, decoded.amount_field) == (WATER, 0, 0)
    assert decoded.token_id == sts.token_id(at("24/04/2006 20:10:00"))
    with pytest.raises(sts.StsError, match="units"):
        sts.credit_token(key, WATER, decoded.token_id, 0, 5)


def test_rounding_is_up_in_the_official_vectors() -> None:
    # What the CTSA10/CTSA12 tokens actually carry, read back out of the expected digits.
    key = key02()
    assert sts.decode_token(key, "71997443697501228179").units == 20_004  # 2000.0 kWh -> 2000.4 kWh
    assert sts.decode_token(key, "58589277912776864555").amount_field == 2 << 14  # 18022.3 -> 18022.4 kWh
    assert sts.decode_token(key, "45001756646344378677").amount_field == 3 << 14  # 181862.3 -> 181862.4 kWh
    assert sts.decode_token(key, "42222423067848970276").amount_field == 0xFFFF


CLASS0_OTHER_KEYS = [
    # (source, decoder key or None, derivation, issued, base year, subclass, units, expected)
    ("CTSA19 step1 (KRN 1, TI 02)", "dkga02", dict(ti="02", krn=1), "01/04/2002 10:05:00", 1993, ELECTRICITY, 1,
     "40823728429161791369"),
    ("CTSA19 step2 (KRN 2)", "dkga02", dict(krn=2), "01/04/2002 10:10:00", 1993, ELECTRICITY, 1,
     "07731698895042112630"),
    ("CTSA19 step3 (KRN 2)", "dkga02", dict(krn=2), "01/04/2002 10:15:00", 1993, ELECTRICITY, 1,
     "02838142732283753296"),
    ("CTSA19 step4 (SGC 888888, vending key 9494...)", "dkga02",
     dict(sgc="888888", vending_key=bytes.fromhex("9494949494949494")), "01/04/2002 10:20:00", 1993, ELECTRICITY, 1,
     "17352963892501043261"),
    ("CTSA25 step1 (DKGA04, 1993)", "dkga04", dict(base_year=1993, krn=1), "01/01/2009 08:00:00", 1993, ELECTRICITY,
     1, "15697331168573253829"),
    ("CTSA25 step2 (DKGA04, 1993)", "dkga04", dict(base_year=1993, krn=1), "01/01/2009 08:05:00", 1993, WATER, 1,
     "56727749990719585416"),
    ("CTSA25 step3 (DKGA04, 1993)", "dkga04", dict(base_year=1993, krn=1), "01/01/2009 08:10:00", 1993, GAS, 1,
     "25938479605175185937"),
    ("CTSA25 step5 (DKGA04, base date 2014)", "dkga04", dict(base_year=2014, krn=4), "01/01/2014 08:00:00", 2014,
     ELECTRICITY, 1, "20324881626382980759"),
    ("CTSA25 step6 (DKGA04, base date 2014)", "dkga04", dict(base_year=2014, krn=4), "01/01/2014 08:05:00", 2014,
     WATER, 1, "09907513011694393160"),
    ("CTSA25 step7 (DKGA04, base date 2014)", "dkga04", dict(base_year=2014, krn=4), "01/01/2014 08:10:00", 2014,
     GAS, 1, "50054427724775110925"),
    ("CTSA25 step9 (DKGA04, base date 2035)", "dkga04", dict(base_year=2035, krn=5), "01/01/2035 08:00:00", 2035,
     ELECTRICITY, 1, "09239624803025986815"),
    ("CTSA25 step10 (DKGA04, base date 2035)", "dkga04", dict(base_year=2035, krn=5), "01/01/2035 08:05:00", 2035,
     WATER, 1, "31176414469542247929"),
    ("CTSA25 step11 (DKGA04, base date 2035)", "dkga04", dict(base_year=2035, krn=5), "01/01/2035 08:10:00", 2035,
     GAS, 1, "13512126869939531125"),
]


@pytest.mark.parametrize(("source", "kind", "derivation", "issued", "base_year", "subclass", "units", "expected"),
                         CLASS0_OTHER_KEYS, ids=[row[0] for row in CLASS0_OTHER_KEYS])
def test_class0_tokens_other_keys_and_base_dates(source: str, kind: str, derivation: dict[str, object], issued: str,
                                                 base_year: int, subclass: int, units: int, expected: str) -> None:
    key = key02(**derivation) if kind == "dkga02" else key04(**derivation)  # type: ignore[arg-type]
    tid = sts.token_id(at(issued), base_year)
    assert sts.credit_token(key, subclass, tid, units, 5) == expected
    assert sts.token_issued_at(sts.decode_token(key, expected).token_id, base_year) == at(issued)


def test_direct_decoder_key_sts_example_key() -> None:
    # NectarAPI/tokens-service src/test/java/ke/co/nectar/token/generators/tokensgenerator/nativetoken/class0/
    # TransferElectricityCreditTokenGeneratorTest.java: decoder key "as specified in the standard" given as the
    # reversed bytes {0x89,0x67,0x45,0xf3,0xde,0x12,0xbc,0x0a}, i.e. the STS example key 0ABC12DEF3456789;
    # 25/03/1996 13:55:22, base date 1993, random 0xB, 25.6 kWh.
    key = bytes.fromhex("0abc12def3456789")
    tid = sts.token_id(at("25/03/1996 13:55:22"))
    assert sts.credit_token(key, ELECTRICITY, tid, 256, 0xB) == "29054347139309851356"


MANAGEMENT = [
    # (source, pan, issued, kind, value, expected); DKGA02 keys.
    ("CTSA03 step1", PAN_A, "28/03/2004 09:01:00", "mpl", 1000, "50901894209860263092"),
    ("CTSA04 step1", PAN_A, "28/03/2004 09:15:00", "clear_credit", 0xFFFF, "29511990995826640868"),
    ("CTSA04 step2", PAN_B, "28/03/2004 09:20:00", "clear_credit", 0xFFFF, "69986678528351463847"),
    ("CTSA06 step1", PAN_A, "28/03/2004 10:00:00", "clear_tamper", 0, "37037300014464855694"),
    ("CTSA09 step1", PAN_A, "29/03/2004 00:00:00", "clear_credit", 0xFFFF, "10208942296089183521"),
    ("CTSA09 step3a", PAN_A, "29/03/2004 00:03:00", "clear_credit", 0xFFFF, "43348834939937913498"),
    ("CTSA09 step3b", PAN_A, "29/03/2004 00:04:00", "clear_credit", 0xFFFF, "51681104150374451564"),
    ("CTSA09 step3c", PAN_A, "29/03/2004 00:05:00", "clear_credit", 0xFFFF, "50526247723864280405"),
    # CTSA12: maximum power limit (watts) at every exponent boundary of the amount encoding.
    ("CTSA12 step1", PAN_A, "01/04/2004 07:00:00", "mpl", 256, "41932934023937597177"),
    ("CTSA12 step2", PAN_A, "01/04/2004 07:05:00", "mpl", 16_383, "39962525051716972228"),
    ("CTSA12 step3", PAN_A, "01/04/2004 07:10:00", "mpl", 16_384, "49726922948713857933"),
    ("CTSA12 step4", PAN_A, "01/04/2004 07:15:00", "mpl", 20_000, "49240429350369491663"),
    ("CTSA12 step5", PAN_A, "01/04/2004 07:20:00", "mpl", 180_223, "59901462710025767433"),
    ("CTSA12 step6", PAN_A, "01/04/2004 07:25:00", "mpl", 180_224, "19230023168014606006"),
    ("CTSA12 step7", PAN_A, "01/04/2004 07:30:00", "mpl", 1_818_623, "15202793104399278539"),
    ("CTSA12 step8", PAN_A, "01/04/2004 07:35:00", "mpl", 1_818_624, "39289527337368539951"),
    ("CTSA12 step9", PAN_A, "01/04/2004 07:40:00", "mpl", 18_201_624, "64902502692705103624"),
    # CTSA14: clear credit, register by register.
    ("CTSA14 step1", PAN_A, "01/04/2004 09:00:00", "clear_credit", 0, "24406351748405762287"),
    ("CTSA14 step2", PAN_A, "01/04/2004 09:05:00", "clear_credit", 0xFFFF, "48263195037886996694"),
    ("CTSA14 step3", PAN_A, "01/04/2004 09:10:00", "clear_credit", 4, "17696673116286267663"),
    ("CTSA14 step4", PAN_A, "01/04/2004 09:15:00", "clear_credit", 5, "47739859634763202644"),
    ("CTSA14 step5", PAN_A, "01/04/2004 09:20:00", "clear_credit", 6, "23456948011089526127"),
    ("CTSA14 step6", PAN_A, "01/04/2004 09:25:00", "clear_credit", 7, "51867282903899304686"),
]


def management_token(key: bytes, kind: str, tid: int, value: int) -> str:
    if kind == "mpl":
        return sts.set_maximum_power_limit_token(key, tid, value, 5)
    if kind == "clear_credit":
        return sts.clear_credit_token(key, tid, 5, register=value)
    assert kind == "clear_tamper" and value == 0
    return sts.clear_tamper_token(key, tid, 5)


@pytest.mark.parametrize(("source", "pan", "issued", "kind", "value", "expected"), MANAGEMENT,
                         ids=[row[0] for row in MANAGEMENT])
def test_class2_management_tokens(source: str, pan: str, issued: str, kind: str, value: int, expected: str) -> None:
    key = key02(pan)
    tid = sts.token_id(at(issued))
    assert management_token(key, kind, tid, value) == expected
    decoded = sts.decode_token(key, expected)
    assert decoded.crc_ok and decoded.token_class == 2 and decoded.token_id == tid and decoded.units is None
    if kind == "mpl":
        assert decoded.subclass == 0 and decoded.maximum_power_limit_w == sts.rounded_units(value)
    elif kind == "clear_credit":
        assert decoded.subclass == 1 and decoded.register == value
    else:
        assert decoded.subclass == 5 and decoded.amount_field == 0


def test_class2_clear_credit_dkga04_ctsa24() -> None:
    # CTSA24 step1: DKGA04 key (base date 1993, KRN 1), clear all credit, 26/05/2008 08:00.
    key = key04(1993, 1)
    assert sts.clear_credit_token(key, sts.token_id(at("26/05/2008 08:00:00")), 5) == "08144275084202187413"


def test_ctsa09_step2_vector_carries_the_next_minute() -> None:
    # CTSA09 step2 gives a clear-credit token "issued" 29/03/2004 00:01:00 whose TID is the minute 00:02
    # (NectarAPI's TokenIdentifier adds a minute exactly at 00:01; the comment on CTSA09 step 3 ties it
    # to "multiple tokens generated within the same minute"). We reproduce the digits from the TID the
    # token really carries, and show the plain 00:01 TID does not give them.
    key = key02()
    expected = "20388873191656671689"
    decoded = sts.decode_token(key, expected)
    assert decoded.crc_ok and decoded.token_id == sts.token_id(at("29/03/2004 00:02:00"))
    assert sts.clear_credit_token(key, decoded.token_id, 5) == expected
    assert sts.clear_credit_token(key, sts.token_id(at("29/03/2004 00:01:00")), 5) != expected


def test_maximum_phase_power_unbalance_limit_token_decodes_ctsa07() -> None:
    # CTSA07 step1: class 2 subclass 6 (set maximum phase power unbalance limit = 10), 28/03/2004 10:20.
    # vendgate does not issue this token; decoding it checks the generic class 2 layout and CRC.
    decoded = sts.decode_token(key02(), "30220533115430798647")
    assert decoded.crc_ok
    assert (decoded.token_class, decoded.subclass, decoded.random) == (2, 6, 5)
    assert decoded.token_id == sts.token_id(at("28/03/2004 10:20:00"))
    assert decoded.amount_field == 10


def test_key_expiry_number_vector_ctsa16_is_past_ken_85() -> None:
    # CTSA16: KEN 85 and a token dated 01/04/2004 09:30 must be refused (key expired). The key expiry
    # number bounds the high 8 bits of the TID; the meter emulator enforces it (tests/sts/test_meter.py).
    assert sts.token_id(at("01/04/2004 09:30:00")) >> 16 > 85


def test_sts_example_pans_have_valid_check_digits() -> None:
    assert sts.meter_pan(PAN_A) == PAN_A and sts.meter_pan(PAN_B) == PAN_B
    assert sts.meter_pan("00000000000") == PAN_A  # 11-digit meter number -> IIN 600727
    assert sts.meter_pan("0100000000008") == PAN_B  # 13-digit meter number -> IIN 0000
