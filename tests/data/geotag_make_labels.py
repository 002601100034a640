"""Rebuilds tests/data/geotag_labels.jsonl from the hand labels below and the shared fixtures.

Each label names a fixture caption by a unique piece of its text; the full caption is looked
up in the fixtures. Run from the project root: ``python tests/data/geotag_make_labels.py``.
"""

# ruff: noqa: E501
import collections
import json
import random
import re
from pathlib import Path

import pyarrow.parquet as pq

F = "../shared/fixtures/"


def _read(path: str) -> str:
    return Path(F, path).read_text(encoding="utf-8")


def _sentences(name: str) -> list[str]:
    images = json.loads(_read("rs_captions/ucm_sydney_captions/" + name))["images"]
    return [s["raw"] for im in images for s in im["sentences"]]


laion = [
    x for x in pq.read_table(F + "metadata/test_10000.parquet").column("TEXT").to_pylist() if x
]
cc3m = [
    line.split("\t")[0]
    for line in _read("metadata/Validation_GCC-1.1.0-Validation.tsv").splitlines()
]
syd = _sentences("dataset_sydney_modified.json")
ucm = _sentences("dataset_ucm_modified.json")
rsicd = [
    a["caption"]
    for f in ["rsicd_captions_test_coco.json", "rsicd_captions_val_coco.json"]
    for a in json.loads(_read("rs_captions/rsicd_captions/" + f))["annotations"]
]
pools = {"laion": laion, "cc3m": cc3m, "sydney": syd, "ucm": ucm, "rsicd": rsicd}
US, GB = "US", "GB"
L = [
    # --- CC3M validation (hypernymised, lower case) ---
    (
        "cc3m",
        "a model walks the runway at the fashion show during paris menswear fashion week",
        [("Paris", "FR")],
    ),
    ("cc3m", "actor attends the los angeles premiere", [("Los Angeles", US)]),
    (
        "cc3m",
        "event from london to brighton crossing a city in the early morning fog",
        [("London", GB), ("Brighton", GB)],
    ),
    ("cc3m", "the lost rivers of london", [("London", GB)]),
    ("cc3m", "cricket player fields the ball against england", [("England", GB)]),
    ("cc3m", "a big national flag is displayed against denmark in match .", [("Denmark", "DK")]),
    ("cc3m", "southern united states restaurant from the outside", [("United States", US)]),
    (
        "cc3m",
        "northern terminus of the trail atop new england fifty finest mountain .",
        [("New England", US)],
    ),
    ("cc3m", "paris and tower on distressed wood .", [("Paris", "FR")]),
    ("cc3m", "a performance by students from schools which was watched by the prince of wales", []),
    (
        "cc3m",
        "image of young asia boy looking on right side in the park near the river on day time .",
        [],
    ),
    ("cc3m", "domestic turkey walking in the yard", []),
    ("cc3m", "nice fabric for upholstery can run so expensive .", []),
    ("cc3m", "man holding a tray of colours while talking on a mobile phone", []),
    ("cc3m", "pouring orange juice from a jar into a glass", []),
    ("cc3m", "illustration of a little girl taking a bath", []),
    ("cc3m", "boy and girl reading books in the woods at night illustration", []),
    ("cc3m", "cat walking on the beach at sunset .", []),
    ("cc3m", "the girls look out of the window in surprise", []),
    ("cc3m", "a cute cow at wedding", []),
    # --- remote-sensing captions (RSICD, Sydney, UCM): none name a place but one ---
    (
        "rsicd",
        "here lies a spectacular oval stadium with numerous bleachers painted blue and white which spell marseille .",
        [("Marseille", "FR")],
    ),
    ("rsicd", "two bridges are on a white river with many buildings on two sides of it .", []),
    (
        "rsicd",
        "the playground locates in the gap between two builidngs with a swimming pool beside .",
        [],
    ),
    ("rsicd", "the hue of the stadium is bright .", []),
    (
        "rsicd",
        "there are three baseball fields and a tennis court on the four corners of the square lawn .",
        [],
    ),
    ("rsicd", "the viaduct with a cloverleaf shaped ramp is across the road .", []),
    ("rsicd", "eight white storage tanks are linked together with pipes .", []),
    (
        "sydney",
        "Lots of houses arranged densely in the residential area and a piece of lawn in the lower right corner .",
        [],
    ),
    ("sydney", "A residential area with many houses of red and grey roofs arranged neatly .", []),
    ("sydney", "This is a part of deep green sparkling sea with a red line in the middle .", []),
    ("sydney", "There are many buildings densely arranged in the industrial buildings .", []),
    ("ucm", "A big white airplane and a small grey one are stopped at the airport .", []),
    ("ucm", "This is a dense forest with lots of dark green trees .", []),
    ("ucm", "There are lots of green trees in a dense forest .", []),
    # --- web alt-text (img2dataset test_10000, LAION-style) ---
    ("laion", "150 Jumbo Brown COTURNIX and TEXAS A&M QUAIL HATCHING EGGS", []),
    (
        "laion",
        "stainless steel wire mesh suppliers in uae Steel Grating, Emerald Gratings, Ajman, UAE",
        [("United Arab Emirates", "AE"), ("Ajman", "AE")],
    ),
    (
        "laion",
        "The Crazy Rich Asians are in Hong Kong but Singapore steals the limelight",
        [("Hong Kong", "HK"), ("Singapore", "SG")],
    ),
    ("laion", "in Speculator, New York", [("Speculator", US), ("New York", US)]),
    ("laion", "Rendering of the Atton Brickell Hotel in Miami", [("Miami", US)]),
    ("laion", "W New York Downtown. Residences at the W Hotel.", [("New York City", US)]),
    ("laion", "Wisconsin Buys Local - Latitudes travel badge", [("Wisconsin", US)]),
    (
        "laion",
        "Ireland vs Italy live rugby RBS Six Nations rugby 2011 live",
        [("Ireland", "IE"), ("Italy", "IT")],
    ),
    (
        "laion",
        "Best Retro Game Stores Near Cleveland and Northeast Ohio",
        [("Cleveland", US), ("Ohio", US)],
    ),
    ("laion", "at the AMAs, Los Angeles, Nov. 18, 2012", [("Los Angeles", US)]),
    ("laion", "Valentine's Day Gifts For Boyfriend  Agra", [("Agra", "IN")]),
    ("laion", "location: 7742 DUNBARTON Avenue Los Angeles 90045", [("Los Angeles", US)]),
    ("laion", "Vivien Leigh - vivien-leigh photo", []),
    ("laion", "Old Cairo Fine Art Print by G. Pinotti", [("Cairo", "EG")]),
    ("laion", "Judy A Davis Photography, Tucson, Arizona", [("Tucson", US), ("Arizona", US)]),
    ("laion", "NHL A Badass Chicago Blackhawks Fan Adidas Hockey Sports T-Shirt", []),
    ("laion", "laos tribal women", [("Laos", "LA")]),
    ("laion", "Antarctica Penguin Rectangle Magnet", [("Antarctica", "AQ")]),
    (
        "laion",
        "Antique 19th Century London Solid Silver Mustard Pot Arthur Sibley 1871",
        [("London", GB)],
    ),
    ("laion", "Post Game Interview with Cayman Richardson", []),
    ("laion", "Seine in Paris with Eiffel tower in morning time", [("Paris", "FR")]),
    ("laion", "New York Yankees Navy T-Shirt", []),
    (
        "laion",
        "112 W Franklin Street, Shelbyville, IN 46176",
        [("Shelbyville", US), ("Indiana", US)],
    ),
    ("laion", "Fiji FA Confirms International Games In March", [("Fiji", "FJ")]),
    ("laion", "Most Romantic Places in Belgium", [("Belgium", "BE")]),
    ("laion", "Sunrise in the Wolf's Farm - Brazil", [("Brazil", "BR")]),
    (
        "laion",
        "ICE announces human trafficking awareness campaigns in Tampa, Atlanta",
        [("Tampa", US), ("Atlanta", US)],
    ),
    ("laion", "Lower Manhattan - New York Stock Photo", [("Manhattan", US), ("New York City", US)]),
    (
        "laion",
        "Syd Schulz and Macky Franklin take in the central Wasatch Range from the Wasatch Crest Trail, Utah.",
        [("Utah", US)],
    ),
    (
        "laion",
        "Conservative Christian protesters at a 2006 San Francisco Pride event",
        [("San Francisco", US)],
    ),
    ("laion", "Lubeck, Germany Stock Photos", [("Lübeck", "DE"), ("Germany", "DE")]),
    (
        "laion",
        "Supreme court building exterior in Washington DC, USA.",
        [("Washington", US), ("United States", US)],
    ),
    ("laion", "No. 3 Kansas outlasts Texas Tech as Josh Jackson scores 31", []),
    ("laion", "Benfica can celebrate Europa League success", []),
    (
        "laion",
        "Notable Salafi-Jihadist Attacks in the UK, 2005 to Present",
        [("United Kingdom", GB)],
    ),
    ("laion", "arrive at the Meiji-Jingu shrine in Tokyo", [("Tokyo", "JP")]),
    (
        "laion",
        "Are you looking for secure gatehouse cabins in Colchester, Harwich, Sudbury, Chelmsford, Braintree, Ipswich, Witham, Halstead, Sizewell, Woodbridge, Essex, Suffolk and throughout the UK?",
        [
            (n, GB)
            for n in [
                "Colchester",
                "Harwich",
                "Sudbury",
                "Chelmsford",
                "Braintree",
                "Ipswich",
                "Witham",
                "Halstead",
                "Sizewell",
                "Woodbridge",
                "Essex",
                "Suffolk",
                "United Kingdom",
            ]
        ],
    ),
    (
        "laion",
        "sailing in Sardinia & Sicily - July 2011 Photo",
        [("Sardinia", "IT"), ("Sicily", "IT")],
    ),
    ("laion", "Shimla Manali Tour Package", [("Shimla", "IN"), ("Manali", "IN")]),
    (
        "laion",
        "Sonali Bendre on the cover of Prevention (India) - December 2011",
        [("India", "IN")],
    ),
    ("laion", "2014 Ford Fusion SE Richmond KY", [("Richmond", US), ("Kentucky", US)]),
    (
        "laion",
        "India vs New Zealand, 1st Test, Day 4 in Kanpur",
        [("India", "IN"), ("New Zealand", "NZ"), ("Kanpur", "IN")],
    ),
    (
        "laion",
        "Oil Well Platforms Morning Pacific Ocean Landscape Santa Barbara Stock Images",
        [("Santa Barbara", US)],
    ),
    ("laion", "Karakol to Bishkek: Bike Touring Route", [("Karakol", "KG"), ("Bishkek", "KG")]),
    (
        "laion",
        "The long road back: Cork hurler facing up to his biggest challenge",
        [("Cork", "IE")],
    ),
    ("laion", "Harkins ~ Picture Oregon", [("Oregon", US)]),
    (
        "laion",
        "good or bad credit loans North Reading, Massachusetts",
        [("North Reading", US), ("Massachusetts", US)],
    ),
    ("laion", "An Independent Study Guide to Reading Latin", []),
    ("laion", "Printable Reading Worksheets Grade 1", []),
    (
        "laion",
        "Ermete - Nice, France - Scuba Diving - GoPro Hero 3+ BE",
        [("Nice", "FR"), ("France", "FR")],
    ),
    (
        "laion",
        "Home Tree House Nice On Home Pertaining To 12 Homes You Should Consider 1 Tree House",
        [],
    ),
    (
        "laion",
        "relic recovered the Stalingrad battlefield 1942-1943 in Russia",
        [("Volgograd", "RU"), ("Russia", "RU")],
    ),
    (
        "laion",
        "NICE PHOTOS: ABU Economics class of 2000, Lagos chapter's Get-together 8",
        [("Lagos", "NG")],
    ),
    (
        "laion",
        "Project Nursery - Pom Pom Baby Mobile -- plant holder thing for attaching mobile",
        [],
    ),
    ("laion", "Precision Mobile WorkStation M240", []),
    ("laion", "Tan Bath Rug 17inches x 24 inches silo front", []),
    ("laion", "City Of Bath Vincent Van Gogh Backpack", [("Bath", GB)]),
    ("laion", "Bath Parlor", []),
    ("laion", "Spooky Jack O Lantern Face Blk Original Orange Photo Card", []),
    ("laion", "Orange & Grapefruit Soap Bar - 95g", []),
    (
        "laion",
        "Valor H6 Series Fireplace Victoria BC",
        [("Victoria", "CA"), ("British Columbia", "CA")],
    ),
    (
        "laion",
        "Detail of houseboat walls. Victoria, British Columbia, Canada",
        [("Victoria", "CA"), ("British Columbia", "CA"), ("Canada", "CA")],
    ),
    (
        "laion",
        "In this image taken from video, England's soccer star David Beckham, left and his wife Victoria arrive at Westminster Abbey for the Royal Wedding in London. (AP)",
        [("England", GB), ("London", GB)],
    ),
    ("laion", "Range Rover Evoque Special Edition by Victoria Beckham (11)", []),
    (
        "laion",
        "Salera's Melbourne, Victoria and Brisbane, Queensland Australia",
        [
            ("Melbourne", "AU"),
            ("Victoria", "AU"),
            ("Brisbane", "AU"),
            ("Queensland", "AU"),
            ("Australia", "AU"),
        ],
    ),
    (
        "laion",
        "The hillside town of Lindos, Rhodes | Hello Victoria",
        [("Lindos", "GR"), ("Rhodes", "GR")],
    ),
    ("laion", "The new iPad crosses China regulatory stunts", [("China", "CN")]),
    ("laion", "inside-blue-mosque-istanbul-turkey", [("Istanbul", "TR"), ("Turkey", "TR")]),
    ("laion", "Thanksgiving Turkey Sign - Benchart's Shop", []),
    ("laion", "Roast turkey with orange and herbs for Christmas dinner", []),
    ("laion", "Endless Love review: A Valentine's turkey", []),
    ("laion", "It's been a whirlwind of a year for Jordan Smith", []),
    ("laion", "Air Jordan 12 Retro 'Hyper Jade' GS", []),
    ("laion", "cheap jordan sport clothes 18414", []),
    ("laion", "Lakers Rumors: L.A. Must Continue to Pursue Jordan Hill", []),
    (
        "laion",
        "Paris Photograph - French Photography - Polaroid Photograph - Along the Seine- Signed Fine Art Photograph",
        [("Paris", "FR")],
    ),
    ("laion", "Notre Dame de Paris carhedral — Stock Photo #7492393", [("Paris", "FR")]),
    ("laion", "Georgia waving flag against blue sky — Stock Photo #11031981", [("Georgia", "GE")]),
    (
        "laion",
        "2020 Can-Am Defender MAX Lone Star HD10 in Statesboro, Georgia - Photo 1",
        [("Statesboro", US), ("Georgia", US)],
    ),
    ("laion", "Nike Georgia Bulldogs Youth Black Team Beanie", []),
    ("laion", "Billy Scott and Georgia Prophets Anthology", []),
    (
        "laion",
        "The medieval Gelati monastic complex near Kutaisi in the Imereti region of western Georgia (country).",
        [("Kutaisi", "GE"), ("Imereti", "GE"), ("Georgia", "GE")],
    ),
    (
        "laion",
        "Ben Nadel at InVision In Real Life (IRL) 2019 (Phoenix, AZ) with: Michiel Westerbeek",
        [("Phoenix", US), ("Arizona", US)],
    ),
    ("laion", "Men's SH/FT™ Breeze Shoe - Graphite, Phoenix Blue - SALE", []),
    ("laion", "Group of people bicycling in downtown Phoenix", [("Phoenix", US)]),
    ("laion", "Thumbnail 3 bed flat to rent in Phoenix Road, Euston", [("Euston", GB)]),
    ("laion", "George Washington - Oculus Rift Poster", []),
    (
        "laion",
        "NBA Draft 2019 : un enfant de Guinée Conakry vers les Washington Wizards mais pas que...",
        [("Guinea", "GN"), ("Conakry", "GN")],
    ),
    (
        "laion",
        "Seattle, Washington - Saturday, May 20, 2017: Seattle Sounders FC vs Real Salt Lake.",
        [("Seattle", US), ("Washington", US)],
    ),
    (
        "laion",
        "US President-elect Joe Biden and his wife Jill Biden participate in a COVID-19 memorial event at the Lincoln Memorial Reflecting Pool on Jan. 19, 2021, in Washington. (AP/Evan Vucci)",
        [("United States", US), ("Washington", US)],
    ),
    ("laion", "10216 Banks Ct Austin TX, 78739", [("Austin", US), ("Texas", US)]),
    ("laion", "Austin Clothing Co.® Girls' Uniform Pant", []),
    (
        "laion",
        "Anna Janssen and boyfriend Austin Ewell enjoy a boat ride on Red Rock Lake in central Iowa.",
        [("Iowa", US)],
    ),
    (
        "laion",
        "Holiday Inn Express & Suites Austin SW - Sunset Valley in Austin, Texas",
        [("Austin", US), ("Sunset Valley", US), ("Texas", US)],
    ),
    (
        "laion",
        "2018 Lincoln MKZ Reserve in McKinney, Texas 75070",
        [("McKinney", US), ("Texas", US)],
    ),
    (
        "laion",
        "Domestic Shorthair Cat for adoption in Lincoln, Nebraska - Zariel (Zari)",
        [("Lincoln", US), ("Nebraska", US)],
    ),
    ("laion", "Womens Black Brogue Style Studded Chelsea Boots", []),
    ("laion", "Oil Lamp Greeting Cards - Florence Nightingale Greeting Card by Granger", []),
    (
        "laion",
        "The Bulldogs celebrate a try scored by Greg Eastwood of the Bulldogs during the NRL Preliminary Final match between the Canterbury Bulldogs and the South Sydney Rabbitohs at ANZ Stadium on September 22, 2012 in Sydney, Australia.",
        [("Sydney", "AU"), ("Australia", "AU")],
    ),
    (
        "laion",
        "Ryde, Sydney, Australia<br /> Grave of Maria Ann Smith, better known as 'Granny' Smith. St Annes, Ryde.",
        [("Ryde", "AU"), ("Sydney", "AU"), ("Australia", "AU")],
    ),
    ("laion", "Woman's leg severed in Sydney boating accident.", [("Sydney", "AU")]),
    ("laion", "Madison Park Sydney Traditional Wing Dining Chair--Beige", []),
    ("laion", "Sydney 3-Star 2019 – Women Gold – Beach Volleyball World Tour", [("Sydney", "AU")]),
    (
        "laion",
        "Big Ben clock against autumn leaves in London, England, UK",
        [("London", GB), ("England", GB), ("United Kingdom", GB)],
    ),
    (
        "laion",
        "London Hilton, Park lane, England, UK. 1st December 2017. Geri Halliwell attends the Sky Women in Film and TV Awards.",
        [("London", GB), ("England", GB), ("United Kingdom", GB)],
    ),
    ("laion", "Winter In Vermont, Yankee Magazine Cover 2015", [("Vermont", US)]),
    (
        "laion",
        "Banded Dragonfly, Guyana, South America",
        [("Guyana", "GY"), ("South America", None)],
    ),
    (
        "laion",
        "Scenic view of beautiful harbor in Monte Carlo, France — Stock Photo",
        [("Monte Carlo", "MC"), ("France", "FR")],
    ),
    ("laion", "Peter Sagan Wins 2012 Tour de France Stage 1", []),
    ("laion", "Old Wood France Flag Decals For FreeAgent Desk", [("France", "FR")]),
    (
        "laion",
        "France's forward Karim Benzema (front R) vies for the ball with Switzerland's midfielder Gokhan Inler on June 20, 2014",
        [("France", "FR"), ("Switzerland", "CH")],
    ),
    ("laion", "Jeffrey Campbell France Wrap Strap Boots", []),
    (
        "laion",
        "Photo 15: DOWNTOWN Condo for sale : 2 bedrooms : 1240 India #505 in San Diego",
        [("San Diego", US)],
    ),
    (
        "laion",
        "A new pipewort species from a unique, but fragile habitat in India",
        [("India", "IN")],
    ),
    (
        "laion",
        "used Peugeot 108 PURETECH ALLURE in wirral-cheshire",
        [("Wirral", GB), ("Cheshire", GB)],
    ),
    ("laion", "Classical Masterpieces: Xerses & More, Vol. 8 by Various Artists", []),
    ("laion", "Coffee Table with Tray Top Color: Gray", []),
]
out = []
for i, (src, sub, places) in enumerate(L):
    m = [c for c in pools[src] if sub in c]
    assert m, (src, sub)
    cap = min(m, key=len)  # the shortest full caption that contains the text
    out.append(
        {
            "id": f"{src}-{i:03d}",
            "source": src,
            "caption": cap,
            "places": [{"name": n, "country_code": c} for n, c in places],
        }
    )
# Constructed: hard cases the fixtures do not contain (marked, reported separately).
for i, (cap, places) in enumerate(
    [
        ("Paris Hilton arrives at the MTV Video Music Awards", []),
        ("singer Georgia May Jagger on the catwalk", []),
        ("a china plate with a blue pattern on a wooden table", []),
        ("turkey dinner with cranberry sauce and stuffing", []),
        ("new jordan sneakers in red and black", []),
        (
            "We spent a weekend in Reading, Berkshire and then drove to Bath.",
            [("Reading", GB), ("Berkshire", GB), ("Bath", GB)],
        ),
        ("Harbour of Nice at sunset, French Riviera", [("Nice", "FR")]),
        ("Downtown Mobile, Alabama from the river", [("Mobile", US), ("Alabama", US)]),
        ("Orange, New South Wales: the main street", [("Orange", "AU"), ("New South Wales", "AU")]),
        (
            "Inner Harbour of Victoria, British Columbia",
            [("Victoria", "CA"), ("British Columbia", "CA")],
        ),
    ]
):
    out.append(
        {
            "id": f"constructed-{i:03d}",
            "source": "constructed",
            "caption": cap,
            "places": [{"name": n, "country_code": c} for n, c in places],
        }
    )

# Held-out: 30 random captions with a capitalised word after in/at/from/near and 20 random
# ones (seed 2026), labelled before running any backend on them; never used to tune rules.
random.seed(2026)
short = [x for x in laion if len(x) < 200]
used = {r["caption"] for r in out}
loc = [x for x in short if re.search(r"\b(in|at|from|near) [A-Z][a-z]", x) and x not in used]
rnd = [x for x in short if x not in used]
held = random.sample(loc, 30) + random.sample(rnd, 20)
H = {
    0: [("Cape Town", "ZA")],
    1: [("Quincy", US), ("Massachusetts", US)],
    2: [("Barcelona", "ES")],
    3: [("Los Angeles", US)],
    6: [("Hollywood", US)],
    7: [("Winchester Hills", "ZA")],
    8: [("Muskegon", US), ("Michigan", US)],
    9: [("Bluffton", US), ("South Carolina", US)],
    11: [("South Africa", "ZA")],
    14: [("Wembley", GB)],
    20: [("Breda", "NL")],
    21: [("Hong Kong", "HK")],
    22: [("Greenwood Village", US), ("Colorado", US)],
    23: [("Collierville", US), ("Tennessee", US)],
    26: [("Shafter", US), ("California", US)],
    27: [("Charleston", US), ("South Carolina", US)],
    28: [("Saint Louis", US)],
    29: [("Annecy", "FR"), ("France", "FR")],
    32: [("Lofoten", "NO"), ("Norway", "NO")],
    38: [("Bali", "ID")],
    42: [("Largo", US), ("Florida", US)],
}
for i, cap in enumerate(held):
    out.append(
        {
            "id": f"heldout-{i:03d}",
            "source": "laion",
            "split": "heldout",
            "caption": cap,
            "places": [{"name": n, "country_code": c} for n, c in H.get(i, [])],
        }
    )
for r in out:
    r.setdefault("split", "dev")
with open("tests/data/geotag_labels.jsonl", "w") as f:
    for r in out:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
print(
    len(out),
    collections.Counter(r["split"] for r in out),
    sum(bool(r["places"]) for r in out),
    "with places",
    sum(len(r["places"]) for r in out),
    "places",
)
